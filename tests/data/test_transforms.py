"""Batched SSL augmentation and model-input conversion."""

from __future__ import annotations

import pytest
import torch

from poisonscan.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, SSLAugment, blur_matrix, resample_matrix,
                                        to_input)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _batch(n: int = 6, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _identity(size: int, **kw: object) -> SSLAugment:
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0),
                solarize_p=(0.0, 0.0))
    base.update(kw)
    return SSLAugment(size, **base)  # type: ignore[arg-type]


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_to_input_values_and_layout() -> None:
    u8 = _batch(2, 8)
    x = to_input(u8, IMAGENET_MEAN, IMAGENET_STD)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, (u8.float() / 255 - MEAN) / STD)
    assert to_input(u8, channels_last=False).is_contiguous()
    with pytest.raises(TypeError):
        to_input(u8.float())


def test_views_shapes_dtypes_ranges() -> None:
    aug = SSLAugment(16)
    views = aug(_batch(5, 24), torch.Generator().manual_seed(1))
    assert len(views) == 2
    for v in views:
        assert v.shape == (5, 3, 16, 16) and v.dtype == torch.float32
        assert v.is_contiguous(memory_format=torch.channels_last)
        px = _unnorm(v)
        assert torch.isfinite(v).all() and px.min() >= -1e-5 and px.max() <= 1 + 1e-5


def test_seeded_generator_is_deterministic_and_per_sample() -> None:
    aug = SSLAugment(16)
    u8 = _batch(4, 16)
    a = aug(u8, torch.Generator().manual_seed(7))
    b = aug(u8, torch.Generator().manual_seed(7))
    c = aug(u8, torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])                     # two views differ
    same = u8[:1].expand(4, -1, -1, -1).contiguous()       # one image four times: per-sample parameters
    v = aug(same, torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[2], v[3])


def test_identity_settings_return_the_input() -> None:
    u8 = _batch(3, 16)
    v1, v2 = _identity(16)(u8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v1, to_input(u8), atol=1e-4, rtol=0)
    torch.testing.assert_close(v2, to_input(u8), atol=1e-4, rtol=0)


def test_flip_grayscale_solarize() -> None:
    u8 = _batch(3, 12)
    gen = torch.Generator().manual_seed(0)
    flipped = _identity(12, flip_p=1.0)(u8, gen)[0]
    torch.testing.assert_close(flipped, to_input(u8.flip(-1)), atol=1e-4, rtol=0)
    gray = _unnorm(_identity(12, gray_p=1.0)(u8, gen)[0])
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-5, rtol=0)
    lum = (u8.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(gray[:, 0], lum, atol=1e-4, rtol=0)
    sol = _unnorm(_identity(12, solarize_p=(1.0, 0.0))(u8, gen)[0])
    x = u8.float() / 255
    torch.testing.assert_close(sol, torch.where(x >= 128 / 255, 1 - x, x), atol=1e-4, rtol=0)


def test_jitter_without_strength_is_identity_and_with_strength_changes_colours() -> None:
    u8 = _batch(4, 12)
    gen = torch.Generator().manual_seed(0)
    none = _identity(12, jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=1.0)(u8, gen)[0]
    torch.testing.assert_close(none, to_input(u8), atol=1e-4, rtol=0)
    strong = _identity(12, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=1.0)(u8, gen)[0]
    assert (strong - to_input(u8)).abs().mean() > 0.05


def test_crop_of_larger_store_and_blur_keep_constant_images_constant() -> None:
    u8 = torch.full((2, 3, 30, 30), 100, dtype=torch.uint8)
    aug = SSLAugment(16, blur_p=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, solarize_p=(0.0, 0.0))
    for v in aug(u8, torch.Generator().manual_seed(3)):
        torch.testing.assert_close(_unnorm(v), torch.full((2, 3, 16, 16), 100 / 255), atol=1e-4, rtol=0)


def test_resample_and_blur_matrices_are_row_stochastic() -> None:
    r = resample_matrix(torch.tensor([0.0, 3.5]), torch.tensor([20.0, 7.0]), 10, 20)
    assert r.shape == (2, 10, 20) and (r >= 0).all()
    torch.testing.assert_close(r.sum(2), torch.ones(2, 10))
    g = blur_matrix(torch.tensor([0.0, 1.0]), 9, 5)
    torch.testing.assert_close(g[0], torch.eye(9))
    torch.testing.assert_close(g.sum(2), torch.ones(2, 9))
    assert g[1, 4, 4] < 1 and g[1, 4, 3] > 0


def test_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        SSLAugment(8)(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        SSLAugment(8, blur_p=(1.0,), solarize_p=(0.0, 0.2))
