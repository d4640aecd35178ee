"""Pixels of the blended attack."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from poisonscan.attacks.blend import blend_trigger
from poisonscan.attacks.patch import resize_trigger


def test_uniform_trigger_blends_every_pixel() -> None:
    img = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    trig = np.full((5, 5, 3), 255, np.uint8)
    out = blend_trigger(img, trig, 0.2)
    expected = np.clip(np.rint(0.8 * img.astype(np.float32) + 0.2 * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_trigger_is_resized_to_the_whole_image() -> None:
    img = np.zeros((30, 50, 3), np.uint8)
    trig = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8), "RGB")
    out = blend_trigger(img, trig, 1.0)
    assert np.array_equal(out, resize_trigger(trig, 50, 30))             # alpha 1: the resized trigger itself
    half = blend_trigger(img, trig, 0.5)
    assert np.array_equal(half, np.rint(0.5 * resize_trigger(trig, 50, 30).astype(np.float32)).astype(np.uint8))


def test_alpha_bounds_and_determinism() -> None:
    img = np.full((8, 8, 3), 7, np.uint8)
    with pytest.raises(ValueError):
        blend_trigger(img, img, 0.0)
    with pytest.raises(ValueError):
        blend_trigger(img, img, 1.5)
    assert np.array_equal(blend_trigger(img, img[:4], 0.3), blend_trigger(img, img[:4], 0.3))
