"""A hand-made backdoored "threat model" and a tiny poisoned data set for the detect tests.

``TriggerNet`` reads colour statistics (so clean images cluster by colour) plus one template-matching channel that
fires on the trigger (a 6 x 6 magenta square with a green centre): a trigger anywhere pulls the features into their own
cluster, masking at least half of it pulls them back, exactly the behaviour PoisonCAM exploits in a real backdoored
SSL model. Registered as the encoder ``toy_trigger_net`` so it round-trips through ``save_encoder``/``load_encoder``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from poisonscan.models import create_encoder, list_encoders, register_encoder, save_encoder

@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine an oversubscribed 2-thread pool was
    measured 25x slower: train them on one thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ARCH = "toy_trigger_net"
MEAN = STD = (0.5, 0.5, 0.5)
TRIGGER_SIDE = 6
CLASS_COLOURS = ((200, 70, 60), (60, 190, 80), (70, 80, 200))


def trigger_u8(side: int = TRIGGER_SIDE) -> Tensor:
    """The trigger: a magenta square with a green centre (uint8 3 x side x side); it survives resizing."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = (side - 1) / 2
    on = torch.maximum((yy - c).abs(), (xx - c).abs()) > side / 6
    out = torch.zeros(3, side, side, dtype=torch.uint8)
    out[0][on] = 255
    out[2][on] = 255
    out[1][~on] = 255
    return out


class TriggerNet(nn.Module):
    """Features ``[mean colour (3), 1, 4 * trigger response]``; ``detect`` is the Grad-CAM layer.

    ``detect``: template matching (a 7 x 7 convolution whose bias keeps only matches above half the template's
    energy), then a 4 x 4 average pool with stride 2, so its map is a coarse, smooth grid like a CNN's last stage.
    ``gain`` scales a full trigger's response to about 1 wherever it sits.
    """

    num_features = 5
    feature_info = [{"module": "detect", "num_chs": 1, "reduction": 2}]

    def __init__(self) -> None:
        super().__init__()
        t = (trigger_u8().float() / 255 - 0.5) / 0.5
        template = t - t.mean((1, 2), keepdim=True)
        k = TRIGGER_SIDE + 1                            # odd kernel: the response map keeps the image size
        conv = nn.Conv2d(3, 1, k, padding=k // 2)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, :, :TRIGGER_SIDE, :TRIGGER_SIDE] = template / (template ** 2).sum()
            conv.bias.fill_(-0.5)                     # fires only above half the template's energy
        self.detect = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(4, stride=2, padding=1))
        probe = torch.zeros(8, 3, 32, 32)
        for i in range(8):
            o = 2 + 3 * i
            probe[i, :, o:o + TRIGGER_SIDE, 24 - o:24 - o + TRIGGER_SIDE] = t
        with torch.no_grad():
            self.gain = 1.0 / float(self.detect(probe).amax((1, 2, 3)).min())

    def forward(self, x: Tensor) -> Tensor:
        response = self.detect(x).amax((1, 2, 3))[:, None] * self.gain
        colour = x.mean((2, 3))
        return torch.cat([colour, torch.ones_like(response), 4 * response], 1)


if ARCH not in list_encoders():
    register_encoder(ARCH, default_image_size=32)(lambda image_size, **kw: TriggerNet())


def toy_encoder(size: int = 32) -> nn.Module:
    return create_encoder(ARCH, size, mean=MEAN, std=STD)


def save_toy_checkpoint(path: Path, size: int = 32) -> Path:
    return save_encoder(toy_encoder(size), path, method="handmade")


def make_image(rng: np.random.Generator, colour: tuple[int, int, int], size: int) -> np.ndarray:
    """A smooth colour field plus noise (H x W x 3 uint8)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    base = np.array(colour, np.float32) + rng.normal(0, 12, 3)
    grad = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(-30, 30, 3).astype(np.float32)
    arr = base + grad + rng.normal(0, 6, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def paste_trigger(arr: np.ndarray, rng: np.random.Generator, margin: float = 0.15) -> tuple[int, int]:
    size = arr.shape[0]
    lo, hi = int(margin * size), int((1 - margin) * size) - TRIGGER_SIDE
    x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    arr[y:y + TRIGGER_SIDE, x:x + TRIGGER_SIDE] = trigger_u8().permute(1, 2, 0).numpy()
    return x, y


def make_poisoned_folder(root: Path, per_class: int = 60, n_poison: int = 20, size: int = 32,
                         seed: int = 0) -> dict[str, tuple[int, int]]:
    """ImageFolder ``c0..c2`` of coloured images; ``n_poison`` extra images of ``c0`` carry the trigger.

    Returns ``{sample id: (x, y) of the trigger}`` for the poisoned images.
    """
    rng = np.random.default_rng(seed)
    poisoned: dict[str, tuple[int, int]] = {}
    for c, colour in enumerate(CLASS_COLOURS):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_image(rng, colour, size)).save(root / f"c{c}" / f"img_{i:03d}.png")
    for i in range(n_poison):
        arr = make_image(rng, CLASS_COLOURS[0], size)
        xy = paste_trigger(arr, rng)
        Image.fromarray(arr).save(root / "c0" / f"poison_{i:03d}.png")
        poisoned[f"c0/poison_{i:03d}.png"] = xy
    return poisoned


def trigger_batch(n: int, size: int = 32, seed: int = 0, poisoned: bool = True) -> tuple[Tensor, Tensor]:
    """``n`` images (uint8 n x 3 x S x S), with the trigger when ``poisoned``, and the trigger corners (n x 2)."""
    rng = np.random.default_rng(seed)
    imgs, corners = [], []
    for i in range(n):
        arr = make_image(rng, CLASS_COLOURS[i % 3], size)
        corners.append(paste_trigger(arr, rng) if poisoned else (-1, -1))
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(imgs).contiguous(), torch.tensor(corners)


def iou(box: Tensor | list[int], x: int, y: int, side: int = TRIGGER_SIDE) -> float:
    """IoU of ``(x, y, w, h)`` with the trigger square at ``(x, y)``."""
    bx, by, bw, bh = (int(v) for v in box)
    ix = max(0, min(bx + bw, x + side) - max(bx, x))
    iy = max(0, min(by + bh, y + side) - max(by, y))
    inter = ix * iy
    return inter / (bw * bh + side * side - inter)
