"""The CTRL spectral trigger: matrix DCT, block transforms and the added coefficients."""

from __future__ import annotations

import numpy as np
import pytest

from poisonscan.attacks.ctrl import (RGB_TO_YUV, YUV_OFFSET, block_dct2, block_idct2, ctrl_trigger, dct_matrix,
                                     default_freqs, scaled_block)


def _naive_dct(x: np.ndarray) -> np.ndarray:
    n = len(x)
    out = np.array([sum(x[i] * np.cos(np.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)) for k in range(n)])
    out[0] *= np.sqrt(1 / n)
    out[1:] *= np.sqrt(2 / n)
    return out


def test_dct_matrix_is_orthonormal_dct_ii() -> None:
    d = dct_matrix(8)
    assert np.allclose(d @ d.T, np.eye(8))
    x = np.random.default_rng(0).normal(size=8)
    assert np.allclose(d @ x, _naive_dct(x))


def test_block_transform_round_trip_and_layout() -> None:
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 24))
    coef = block_dct2(x, 8)
    assert coef.shape == (2, 3, 2, 8, 3, 8)
    assert np.allclose(block_idct2(coef), x)
    d = dct_matrix(8)
    assert np.allclose(coef[1, 2, 1, :, 2, :], d @ x[1, 2, 8:16, 16:24] @ d.T)   # one tile, by hand


def _yuv(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ RGB_TO_YUV.T + YUV_OFFSET


def test_trigger_adds_the_magnitude_at_the_chosen_frequencies() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(90, 166, (64, 64, 3), dtype=np.uint8)               # mid-range: nothing clips
    out = ctrl_trigger(img, magnitude=60.0, block=32)
    delta = _yuv(out) - _yuv(img)
    for ch in (1, 2):
        coef = block_dct2(delta[..., ch], 32)                              # 2 x 32 x 2 x 32
        for u, v in default_freqs(32):                                     # (15, 15) and (31, 31)
            assert np.allclose(coef[:, u, :, v], 60.0, atol=1.5)
            coef[:, u, :, v] = 0
        assert np.abs(coef).max() < 3.0 and np.sqrt(np.mean(coef ** 2)) < 0.5   # only uint8 rounding elsewhere
    assert np.abs(delta[..., 0]).max() < 1.5                               # luma untouched (up to rounding)


def test_zero_magnitude_is_identity_and_batches_match() -> None:
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)            # sides not multiples of the block
    assert np.array_equal(ctrl_trigger(batch, magnitude=0.0, block=16), batch)
    out = ctrl_trigger(batch, magnitude=50.0, block=16)
    assert out.shape == batch.shape and out.dtype == np.uint8 and not np.array_equal(out, batch)
    for k in range(3):
        assert np.array_equal(out[k], ctrl_trigger(batch[k], magnitude=50.0, block=16))
    assert np.array_equal(out, ctrl_trigger(batch, magnitude=50.0, block=16))


def test_block_choice() -> None:
    assert scaled_block(224, 224) == 32 and scaled_block(96, 96) == 14 and scaled_block(32, 32) == 4
    img = np.full((24, 24, 3), 128, np.uint8)
    assert np.array_equal(ctrl_trigger(img, 40.0, block=32), ctrl_trigger(img, 40.0, block=24))  # cut to the side
    assert not np.array_equal(ctrl_trigger(img, 40.0, block=None), ctrl_trigger(img, 40.0, block=24))
    with pytest.raises(ValueError):
        ctrl_trigger(img, 40.0, freqs=[(30, 30)], block=24)
    with pytest.raises(ValueError):
        ctrl_trigger(img.astype(np.float32), 40.0)
