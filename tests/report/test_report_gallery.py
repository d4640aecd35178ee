"""The PNG gallery of a fake detect run: files, sizes, content, and the numpy colour map."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from poisonscan.report.gallery import (clip_box, colormap, heat_overlay, normalise_map, rank_name, ranking,
                                       write_gallery)
from poisonscan.runs import RunDir


def _open(path) -> Image.Image:
    with Image.open(path) as img:
        img.verify()  # a valid PNG
    img = Image.open(path)
    assert img.format == "PNG"
    return img.convert("RGB")


def _write(fake_run):
    return write_gallery(fake_run.path, fake_run.images, fake_run.summary, fake_run.attention, fake_run.boxes,
                         fake_run.removed, fake_run.clusters, fake_run.scores)


def test_writes_every_file_as_valid_png(fake_run) -> None:
    written = _write(fake_run)
    expected = {"gallery/topk.png", "gallery/removed_by_cluster.png"}
    expected |= {f"gallery/{d}/rank_{r:02d}.png" for d in ("top", "triggers") for r in (1, 2, 3)}
    assert set(written) == expected
    for rel, path in written.items():
        assert path == fake_run.path / rel and path.is_file()
        _open(path)
    assert not list(fake_run.path.glob("gallery/**/.*.tmp"))  # atomic writes leave no temp files


def test_trigger_crops_are_raw_and_clipped(fake_run) -> None:
    _write(fake_run)
    crop1 = np.asarray(_open(fake_run.path / "gallery/triggers/rank_01.png"))
    assert crop1.shape == (8, 8, 3)
    assert (crop1 == 255).all()  # the bright patch at (20, 4, 8, 8)
    image = fake_run.images[1].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(crop1, image[4:12, 20:28])
    crop3 = _open(fake_run.path / "gallery/triggers/rank_03.png")
    assert crop3.size == (4, 4)  # box (28, 28, 8, 8) clipped to the 32 px image


def test_topk_grid_is_upscaled_with_nearest(fake_run) -> None:
    _write(fake_run)
    grid = _open(fake_run.path / "gallery/topk.png")
    # 3 crops of 8 px -> scale ceil(96 / 8) = 12 -> 96 px cells, one row: 8 + 3 * (96 + 8) wide
    assert grid.size == (8 + 3 * 104, 8 + 96 + 34 + 8)
    arr = np.asarray(grid)
    cell = arr[8:8 + 96, 8:8 + 96]
    assert (cell == 255).all()  # rank 1 is the all-white patch, upscaled without blur


def test_attention_panels_side_by_side(fake_run) -> None:
    _write(fake_run)
    panel = _open(fake_run.path / "gallery/top/rank_01.png")
    side = 32 * math.ceil(224 / 32)  # 224
    assert panel.size == (8 + 3 * (side + 8), 8 + 16 + side + 40)
    arr = np.asarray(panel).astype(int)
    y0 = 24
    left = arr[y0:y0 + side, 8:8 + side]
    middle = arr[y0:y0 + side, 16 + side:16 + 2 * side]
    right = arr[y0:y0 + side, 24 + 2 * side:24 + 3 * side]
    image = np.repeat(np.repeat(fake_run.images[1].permute(1, 2, 0).numpy(), 7, 0), 7, 1)
    np.testing.assert_array_equal(left, image)
    assert np.abs(middle - left).mean() > 10  # the heat overlay changes the image
    # the window rectangle (green) is drawn at (20, 4) * 7 on the right panel
    assert tuple(right[4 * 7 + 2, 20 * 7 + 20]) == (0, 255, 0)
    assert tuple(right[100, 100]) == tuple(left[100, 100])


def test_removed_by_cluster_shows_removed_and_kept(fake_run) -> None:
    _write(fake_run)
    img = np.asarray(_open(fake_run.path / "gallery/removed_by_cluster.png"))
    # one cluster (1) with removed images: one row of thumbnails
    assert img.shape[0] == 24 + 8 + (80 + 6 + 8) + 8
    red = np.all(img == (220, 40, 60), axis=-1).sum()
    green = np.all(img == (40, 160, 80), axis=-1).sum()
    assert red > 5 * 4 * 80 and green > 1 * 4 * 80  # 5 removed frames, kept frames


def test_nothing_removed_and_nothing_scored(fake_run) -> None:
    summary = dict(fake_run.summary, top_k=[])
    written = write_gallery(fake_run.path, fake_run.images, summary, {}, {}, np.zeros(24, bool), fake_run.clusters,
                            {})
    assert set(written) == {"gallery/topk.png", "gallery/removed_by_cluster.png"}
    for path in written.values():
        _open(path)


def test_stale_rank_files_are_removed(fake_run) -> None:
    _write(fake_run)
    summary = dict(fake_run.summary, top_k=fake_run.summary["top_k"][:1])
    write_gallery(RunDir(fake_run.path), fake_run.images, summary, fake_run.attention, fake_run.boxes,
                  fake_run.removed, fake_run.clusters, fake_run.scores)
    assert sorted(p.name for p in (fake_run.path / "gallery/top").iterdir()) == ["rank_01.png"]
    assert sorted(p.name for p in (fake_run.path / "gallery/triggers").iterdir()) == ["rank_01.png"]


def test_numpy_input_and_missing_attention(fake_run) -> None:
    images = fake_run.images.numpy()
    written = write_gallery(fake_run.path, images, fake_run.summary, {}, fake_run.boxes, fake_run.removed,
                            fake_run.clusters, fake_run.scores)
    assert "gallery/top/rank_02.png" in written


def test_shape_mismatch_is_an_error(fake_run) -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        write_gallery(fake_run.path, fake_run.images, fake_run.summary, {}, {}, np.zeros(3, bool),
                      fake_run.clusters, {})


def test_ranking_falls_back_to_scores() -> None:
    top = ranking({}, {4: 3, 2: 9, 7: 9, 1: 0}, {2: (1, 2, 3, 4)}, np.arange(10) % 2, k=2)
    assert [(e["rank"], e["index"], e["poison_score"]) for e in top] == [(1, 2, 9), (2, 7, 9)]
    assert top[0]["box"] == [1, 2, 3, 4] and top[0]["cluster"] == 0


def test_colormap_and_overlay() -> None:
    rgb = colormap(np.array([0.0, 0.5, 1.0, np.nan, 2.0]))
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 3)
    assert tuple(rgb[0]) == (0, 0, 128) and tuple(rgb[2]) == (128, 0, 0)  # jet: dark blue .. dark red
    assert tuple(rgb[3]) == tuple(rgb[0]) and tuple(rgb[4]) == tuple(rgb[2])
    assert colormap(np.zeros((4, 5)), "inferno").shape == (4, 5, 3)
    flat = normalise_map(np.full((8, 8), 3.0), 8)
    assert (flat == 0).all()
    up = normalise_map(np.arange(16, dtype=np.float16).reshape(4, 4), 8)
    assert up.shape == (8, 8) and up.min() == 0 and up.max() == 1
    img = np.zeros((8, 8, 3), np.uint8)
    assert heat_overlay(img, np.eye(8), alpha=1.0)[0, 0].tolist() == [128, 0, 0]


def test_helpers() -> None:
    assert clip_box((-4, 2, 10, 10), 8) == (0, 2, 6, 6)
    assert clip_box((9, 9, 2, 2), 8) is None and clip_box(None, 8) is None
    assert rank_name(3, 20) == "rank_03" and rank_name(7, 150) == "rank_007"
