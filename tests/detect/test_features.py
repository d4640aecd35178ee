"""Features: normalisation, zero masks in normalised space, L2 norm, batching and torch.distributed sharding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from poisonscan.data.transforms import to_input
from poisonscan.detect.features import encode, extract_features, normalise_u8
from poisonscan.runtime import Runtime

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Flatten(nn.Module):
    """'Encoder' returning its input pixels: lets a test read back exactly what the model saw."""

    mean, std = MEAN, STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class TinyConv(nn.Module):
    mean, std = MEAN, STD
    feature_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def fp32() -> Runtime:
    return Runtime(torch.device("cpu"), None)


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_normalise_matches_to_input() -> None:
    u8 = images(3)
    assert torch.equal(normalise_u8(u8, MEAN, STD), to_input(u8, MEAN, STD))


def test_encode_normalises_input_and_output() -> None:
    u8 = images(4)
    feats = encode(Flatten(), u8, fp32())
    expected = to_input(u8, MEAN, STD).flatten(1)
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("shape", ["n", "one", "plain"])
def test_zero_mask_zeroes_normalised_pixels(shape: str) -> None:
    u8 = images(2)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 1:4] = True
    arg = {"n": mask, "one": mask[:1], "plain": mask[0]}[shape]
    seen = encode(Flatten(), u8, fp32(), zero_mask=arg).view(2, 3, 8, 8)
    assert (seen[:, :, 2:5, 1:4] == 0).all()
    # unmasked pixels keep their normalised value (up to the common L2 scale), i.e. zero is in normalised space
    raw = to_input(u8, MEAN, STD)
    raw[:, :, 2:5, 1:4] = 0
    torch.testing.assert_close(seen, (raw.flatten(1) / raw.flatten(1).norm(dim=1, keepdim=True)).view(2, 3, 8, 8))
    assert (seen[:, :, 0] != 0).any()


def test_extract_features_batches_and_mode() -> None:
    torch.manual_seed(0)
    enc = TinyConv().train()
    u8 = images(11)
    a = extract_features(enc, u8, fp32(), batch_size=3, quiet=True)
    b = extract_features(enc, u8, fp32(), batch_size=100, quiet=True)
    assert a.shape == (11, 8) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert enc.training  # the caller's mode is restored; features were computed in eval mode
    enc.eval()
    single = encode(enc, u8[:1], fp32()).numpy()
    np.testing.assert_allclose(a[:1], single, atol=1e-5)


def test_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(0)
    enc = TinyConv().eval()
    u8 = images(6)
    full = extract_features(enc, u8, fp32(), quiet=True)
    half = extract_features(enc, u8, Runtime(torch.device("cpu"), torch.bfloat16), quiet=True)
    assert half.dtype == np.float32
    assert np.abs(full - half).max() < 0.05


def test_empty_input() -> None:
    out = extract_features(TinyConv(), images(0), fp32(), quiet=True)
    assert out.shape == (0, 8)


def _dist_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        enc = TinyConv().eval()
        feats = extract_features(enc, images(7), Runtime(torch.device("cpu"), None, rank, world), batch_size=2,
                                 quiet=True)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), feats)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_shards_gather_to_same_result(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_dist_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    expected = extract_features(TinyConv().eval(), images(7), fp32(), quiet=True)
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{rank}.npy"), expected, atol=1e-5)


def test_extract_features_float16_storage() -> None:
    torch.manual_seed(0)
    enc = TinyConv().eval()
    u8 = images(13)
    full = extract_features(enc, u8, fp32(), batch_size=4, quiet=True)
    half = extract_features(enc, u8, fp32(), batch_size=4, quiet=True, dtype="float16")
    assert half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_allclose(half.astype(np.float32), full, atol=1e-3)
