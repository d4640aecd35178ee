"""PIL histograms of poison scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from poisonscan.report.plots import nice_ticks, score_histogram_image, score_histogram_png

RED, BLUE = (220, 40, 60), (70, 130, 180)


def _count(img: Image.Image, colour: tuple[int, int, int]) -> int:
    """Pixels of ``colour`` in the plot area (below the title and legend)."""
    return int(np.all(np.asarray(img.convert("RGB"))[40:] == colour, axis=-1).sum())


def test_png_with_ground_truth(tmp_path) -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.integers(0, 5, 500), rng.integers(20, 30, 10)])
    flags = np.r_[np.zeros(500, bool), np.ones(10, bool)]
    path = score_histogram_png(scores, flags, tmp_path / "sub" / "hist.png")
    with Image.open(path) as img:
        img.verify()
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (720, 360)
    assert _count(img, RED) > 50 and _count(img, BLUE) > 500


def test_single_series_and_threshold(tmp_path) -> None:
    img = score_histogram_image(np.linspace(0, 1, 200), None, bins=20, threshold=0.5, size=(400, 200))
    assert img.size == (400, 200) and _count(img, BLUE) > 100 and _count(img, RED) == 0


def test_non_finite_and_empty_inputs(tmp_path) -> None:
    img = score_histogram_image([np.nan, 3, 3, np.inf], [True, False, False, True])
    assert _count(img, BLUE) > 0 and _count(img, RED) == 0  # only the finite clean scores remain
    empty = score_histogram_image([], None)
    assert _count(empty, BLUE) == 0
    assert score_histogram_png([], [], tmp_path / "e.png").is_file()


def test_log_axis_keeps_rare_series_visible() -> None:
    scores = np.r_[np.zeros(100_000), np.full(3, 40)]
    flags = np.r_[np.zeros(100_000, bool), np.ones(3, bool)]
    linear = score_histogram_image(scores, flags, log_y=False)
    auto = score_histogram_image(scores, flags)
    assert _count(auto, RED) > 4 * max(_count(linear, RED), 1)


def test_flags_must_match() -> None:
    with pytest.raises(ValueError):
        score_histogram_image([1, 2, 3], [True])


def test_nice_ticks() -> None:
    assert nice_ticks(0, 100, 6) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.13, 0.9) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(5, 5) == [5]
