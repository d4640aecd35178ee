"""Pixels of the HTBA patch attack and its placement helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisonscan.attacks.patch import (IDENTITY, Transform, corner_range, draw_transform, load_trigger,
                                      paste_trigger, random_corner, resize_trigger, trigger_side)
from poisonscan.errors import UsageError


def _image(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _trigger(size: int = 16) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) % 2 * 255], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def test_opaque_paste_replaces_only_the_box() -> None:
    img, trig = _image(), _trigger()
    before = img.copy()
    out = paste_trigger(img, trig, x=10, y=5, size=12)
    assert np.array_equal(img, before)                                  # input untouched
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[5:17, 10:22], resize_trigger(trig, 12))   # the resized trigger, exactly
    mask = np.ones(img.shape[:2], bool)
    mask[5:17, 10:22] = False
    assert np.array_equal(out[mask], img[mask])                         # nothing else changed


def test_partial_opacity_blends_inside_the_box() -> None:
    img = np.full((20, 20, 3), 100, np.uint8)
    trig = np.full((8, 8, 3), 200, np.uint8)
    out = paste_trigger(img, trig, 4, 6, 8, opacity=0.25)
    assert np.all(out[6:14, 4:12] == 125)                               # 0.75 * 100 + 0.25 * 200
    assert np.all(out[:6] == 100) and np.all(out[14:] == 100) and np.all(out[:, :4] == 100)


def test_gains_recolour_the_pasted_copy() -> None:
    img, trig = _image(), np.full((8, 8, 3), 100, np.uint8)
    out = paste_trigger(img, trig, 4, 6, 8, transform=Transform(gains=(0.5, 1.0, 2.0)))
    assert np.all(out[6:14, 4:12] == np.array([50, 100, 200], np.uint8))
    assert np.array_equal(paste_trigger(img, trig, 4, 6, 8, transform=IDENTITY), paste_trigger(img, trig, 4, 6, 8))


def test_a_turned_copy_keeps_the_image_in_the_corners_it_leaves() -> None:
    img = np.full((32, 32, 3), 40, np.uint8)
    trig = np.full((16, 16, 3), 240, np.uint8)
    out = paste_trigger(img, trig, 8, 8, 16, transform=Transform(angle=45.0))
    box = out[8:24, 8:24, 0].astype(int)
    assert box[8, 8] >= 230                                             # the centre is the trigger
    assert box[0, 0] <= 45 and box[15, 15] <= 45                        # the corners keep the image
    assert np.all(out[:8] == 40) and np.all(out[24:] == 40)             # nothing outside the box changes
    assert set(np.unique(box)) <= {40, 240}                             # a hard edge: trigger or image
    half = paste_trigger(img, trig, 8, 8, 16, opacity=0.5, transform=Transform(angle=45.0))[8:24, 8:24, 0]
    assert half[8, 8] == 140 and half[0, 0] == 40                       # opacity blends what the turn covers


def test_draw_transform_stays_in_its_ranges() -> None:
    rng = np.random.default_rng(0)
    assert draw_transform(rng, 0.0, 0.0, 0.0) is IDENTITY
    draws = [draw_transform(rng, 0.25, 30.0, 0.3) for _ in range(200)]
    assert all(0.75 <= t.scale <= 1.25 and -30 <= t.angle <= 30 for t in draws)
    assert all(0.7 <= g <= 1.3 for t in draws for g in t.gains)
    assert len({t.angle for t in draws}) == 200                         # every copy differs


def test_paste_accepts_pil_and_rejects_boxes_outside() -> None:
    pil = Image.fromarray(_image(), "RGB")
    assert np.array_equal(paste_trigger(pil, _trigger(), 0, 0, 8), paste_trigger(_image(), _trigger(), 0, 0, 8))
    with pytest.raises(ValueError):
        paste_trigger(_image(), _trigger(), 40, 0, 10)
    with pytest.raises(ValueError):
        paste_trigger(_image(), _trigger(), 0, 0, 8, opacity=0.0)


def test_trigger_side_fraction_and_pixels() -> None:
    assert trigger_side(50 / 224, 224, 300) == 50
    assert trigger_side(50 / 224, 96, 96) == 21
    assert trigger_side(50 / 224, 32, 32) == 7
    assert trigger_side(8, 32, 32) == 8
    with pytest.raises(ValueError):
        trigger_side(0, 32, 32)


def test_corner_range_follows_the_reference_formula() -> None:
    assert corner_range(224, 50, 0.25) == (56, 118)      # [0.25 W, 0.75 W - 50]
    assert corner_range(224, 50, 0.10) == (22, 151)      # patched val
    with pytest.raises(ValueError, match="larger"):
        corner_range(32, 40, 0.0)
    with pytest.raises(ValueError, match="margins"):
        corner_range(32, 20, 0.25)


def test_random_corner_is_uniform_over_the_range() -> None:
    rng = np.random.default_rng(0)
    xs, ys = zip(*(random_corner(rng, 96, 64, 21, 0.25) for _ in range(3000)))
    assert set(xs) == set(range(24, 72 - 21 + 1)) and set(ys) == set(range(16, 48 - 21 + 1))
    again = np.random.default_rng(0)
    assert [random_corner(again, 96, 64, 21, 0.25) for _ in range(5)] == list(zip(xs, ys))[:5]


def test_load_trigger(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, ..., 3] = 255                                               # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    arr = np.asarray(load_trigger(tmp_path / "t.png"))
    assert arr.shape == (4, 4, 3) and np.all(arr[:2, :, 0] == 255) and np.all(arr[2:] == 0)
    with pytest.raises(UsageError, match="not found"):
        load_trigger(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="not a readable image"):
        load_trigger(tmp_path / "bad.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.ico")                  # a format no data set is decoded with
    with pytest.raises(UsageError, match="not a readable image"):
        load_trigger(tmp_path / "t.ico")
    (tmp_path / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n")  # Ghostscript's
    with pytest.raises(UsageError, match="not a readable image"):
        load_trigger(tmp_path / "eps.png")


def test_a_scaled_box_is_cut_back_to_the_margins_never_below_the_unscaled_side() -> None:
    from poisonscan.attacks.plan import image_box
    from poisonscan.config import PoisonConfig

    cfg = PoisonConfig(trigger_size=10)
    rng = np.random.default_rng(0)
    for scale, side in ((1.0, 10), (0.7, 7), (1.3, 13), (2.0, 16)):     # 32 px at margin 0.25: at most 16 fit
        x, y, w, h = image_box(cfg, rng, 32, 32, 0.25, "img", scale)
        assert w == h == side and 8 <= x <= 24 - side and 8 <= y <= 24 - side
    big = PoisonConfig(trigger_size=16)
    assert image_box(big, rng, 32, 32, 0.25, "img", 1.5)[2] == 16
