"""Paste a trigger on a batch of uint8 images at the model's resolution (the patched validation set protocol)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from poisonscan.attacks.patch import load_trigger, random_corner, resize_trigger, trigger_side
from poisonscan.settings import PAPER

__all__ = ["ATTACKS", "TRIGGER_SIZE", "VAL_MARGIN", "apply_trigger_batch", "read_trigger", "paste_trigger_batch"]

#: the attacks whose trigger the evaluation can apply at the model's resolution
ATTACKS = ("patch", "blend", "ctrl")

#: trigger side as a fraction of the image side (50 px of 224) and the patched-val margin (Saha et al.)
TRIGGER_SIZE = PAPER.trigger_size / PAPER.reference_size
VAL_MARGIN = PAPER.val_margin


def read_trigger(path: Path | str) -> torch.Tensor:
    """A trigger file as a uint8 ``3 x H x W`` tensor (``UsageError`` when unreadable)."""
    arr = np.asarray(load_trigger(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _trigger_array(trigger: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(trigger, Image.Image):
        return np.asarray(trigger.convert("RGB"), dtype=np.uint8)
    arr = trigger.numpy() if isinstance(trigger, torch.Tensor) else np.asarray(trigger)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"trigger must be a uint8 3 x H x W or H x W x 3 image, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def paste_trigger_batch(images_u8: torch.Tensor, trigger: torch.Tensor | np.ndarray | Image.Image, *,
                        size: float = TRIGGER_SIZE, margin: float = VAL_MARGIN,
                        seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A patched copy of ``images_u8`` (N x 3 x S x S) and the N x 4 ``(x, y, w, h)`` boxes used.

    The trigger is resized once to ``size`` of the side (a fraction below 1, else pixels) and pasted fully opaque
    with its top-left corner uniform in ``[m S, (1 - m) S - side]`` on both axes, drawn from ``seed``.
    """
    if images_u8.ndim != 4 or images_u8.shape[1] != 3 or images_u8.dtype != torch.uint8:
        raise ValueError(f"expected uint8 N x 3 x S x S images, got {images_u8.dtype} {tuple(images_u8.shape)}")
    n, _, h, w = images_u8.shape
    side = trigger_side(size, w, h)
    patch = torch.from_numpy(np.array(resize_trigger(_trigger_array(trigger), side))).permute(2, 0, 1)
    patch = patch.to(images_u8.device)
    rng = np.random.default_rng(seed)
    corners = np.array([random_corner(rng, w, h, side, margin) for _ in range(n)], dtype=np.int64).reshape(n, 2)
    out = images_u8.clone()
    for i, (x, y) in enumerate(corners):
        out[i, :, y:y + side, x:x + side] = patch
    boxes = np.concatenate([corners, np.full((n, 2), side, dtype=np.int64)], axis=1)
    return out, boxes


def apply_trigger_batch(images_u8: torch.Tensor, trigger: torch.Tensor | np.ndarray | Image.Image | None, *,
                        attack: str = "patch", size: float = TRIGGER_SIZE, margin: float = VAL_MARGIN, seed: int = 0,
                        blend_alpha: float = 0.2, ctrl_magnitude: float = 100.0,
                        ctrl_block: int | None = None) -> torch.Tensor:
    """``images_u8`` (N x 3 x S x S) carrying the attack's trigger, as ``poison`` applies it to the patched val set.

    ``patch``: :func:`paste_trigger_batch`; ``blend``: the trigger resized (bicubic) to the whole image and
    alpha-blended, ``round((1 - a) x + a t)``; ``ctrl``: the CTRL spectral trigger (``trigger`` unused), block
    ``ctrl_block`` (None: scaled with the image, 32 px on 224 px).
    """
    if attack == "patch":
        return paste_trigger_batch(images_u8, trigger, size=size, margin=margin, seed=seed)[0]
    if images_u8.ndim != 4 or images_u8.shape[1] != 3 or images_u8.dtype != torch.uint8:
        raise ValueError(f"expected uint8 N x 3 x S x S images, got {images_u8.dtype} {tuple(images_u8.shape)}")
    if attack == "blend":
        from poisonscan.attacks.blend import blend_trigger

        pattern = _trigger_array(trigger)
        arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([blend_trigger(img, pattern, blend_alpha) for img in arr])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images_u8.device)
    if attack == "ctrl":
        from poisonscan.attacks.ctrl import ctrl_trigger

        arr = images_u8.permute(0, 2, 3, 1).cpu().numpy()
        out = ctrl_trigger(arr, ctrl_magnitude, block=ctrl_block or None)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images_u8.device)
    raise ValueError(f"attack {attack!r}: choose one of {', '.join(ATTACKS)}")
