"""PIL charts: tick choice and valid PNGs of the expected size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from poisonscan.eval.plots import histogram_chart, line_chart, nice_ticks


def test_nice_ticks() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 100, 4) == [0, 25, 50, 75, 100]
    assert nice_ticks(-3.3, 6.1) == [-2, 0, 2, 4, 6]
    assert nice_ticks(2, 2) == [2]


def test_charts_are_pngs() -> None:
    png = line_chart([("a", [0, 0.5, 1], [1, 0.5, 0.2]), ("b", [0, 1], [1, 1])], title="PR", xlabel="recall",
                     ylabel="precision", xlim=(0, 1), ylim=(0, 1), step=True)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (720, 480)
    # the first series is drawn in the first palette colour
    assert (np.asarray(img.convert("RGB")) == (31, 119, 180)).all(-1).sum() > 100
    rng = np.random.default_rng(0)
    png = histogram_chart([("clean", rng.normal(size=500)), ("poisoned", rng.normal(3, 1, 50)),
                           ("empty", [])], title="scores", xlabel="score")
    assert Image.open(io.BytesIO(png)).size == (720, 480)
    # a single point and constant values still draw
    assert line_chart([("p", [1], [1])], title="t", xlabel="x", ylabel="y")[:4] == b"\x89PNG"
    assert histogram_chart([("c", [1.0, 1.0])], title="t", xlabel="x")[:4] == b"\x89PNG"
