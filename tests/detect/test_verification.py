"""Verification of isolated flags: the occlusion grid, the window the classifier looks at, candidates and the bar."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from poisonscan.detect.verification import (occlusion_grid, occlusion_windows, verification_bar,
                                            verification_candidates)
from poisonscan.runtime import setup_runtime


class SpotDetector(nn.Module):
    """A stand-in poison classifier: its poison logit grows with the red channel's brightness in a 6 x 6 spot (its
    input is normalised: about 2.2 for 255, 0.07 for the grey 128)."""

    def __init__(self, x: int, y: int) -> None:
        super().__init__()
        self.x, self.y = x, y

    def forward(self, img: Tensor) -> Tensor:
        v = img[:, 0, self.y:self.y + 6, self.x:self.x + 6].mean(dim=(1, 2)) - 1
        return torch.stack([-v, v], dim=1) * 4


def test_occlusion_grid_covers_both_borders_with_about_grid_positions_per_side():
    corners = occlusion_grid(32, 6, grid=24)
    xs = sorted({x for x, _ in corners})
    assert xs[0] == 0 and xs[-1] == 26 and len(xs) <= 24 + 1
    assert len(corners) == len(xs) ** 2
    assert np.diff(xs).max() <= 2                                   # stride ceil(27 / 24) = 2, last one flush
    assert occlusion_grid(8, 8) == [(0, 0)]
    assert len(occlusion_grid(224, 60)) == len({x for x, _ in occlusion_grid(224, 60)}) ** 2
    with pytest.raises(ValueError, match="larger"):
        occlusion_grid(16, 20)


def test_occlusion_finds_the_window_that_makes_the_classifier_flag():
    runtime = setup_runtime("cpu", precision="fp32")
    images = torch.full((5, 3, 32, 32), 20, dtype=torch.uint8)
    images[:, 0, 10:16, 20:26] = 255                                  # the "trigger" the stand-in responds to
    images[2, 1] = 200                                                # another colour elsewhere changes nothing
    boxes, p_min = occlusion_windows([SpotDetector(20, 10)], images, 6, runtime, batch_size=100)
    assert boxes.shape == (5, 4) and boxes.dtype == torch.int64
    assert (boxes == torch.tensor([20, 10, 6, 6])).all()
    assert (p_min < 0.5).all()
    # an ensemble of two chunks of images gives the same windows (MAX_COPIES bounds the copies, not the result)
    import poisonscan.detect.verification as V
    old, V.MAX_COPIES = V.MAX_COPIES, 200
    try:
        again, _ = occlusion_windows([SpotDetector(20, 10), SpotDetector(20, 10)], images, 6, runtime)
    finally:
        V.MAX_COPIES = old
    assert (again == boxes).all()


def test_candidates_are_the_kept_confident_flags_and_one_turns_the_step_off():
    probs = np.array([0.95, 0.99, 0.5, 0.2, 0.93])
    removed = np.array([True, False, False, False, False])
    assert verification_candidates(probs, removed, 0.9).tolist() == [1, 4]
    assert verification_candidates(probs, removed, 0.4).tolist() == [1, 2, 4]
    assert verification_candidates(probs, removed, 1.0).size == 0


def test_the_bar_leaves_out_null_windows_cut_from_flagged_images():
    scores = np.array([10, 12, 30, 8, 29])
    sources = np.array([0, 1, 2, 3, 2])                               # windows 2 and 4 from image 2 (a poison)
    unflagged = np.array([True, True, False, True])
    assert verification_bar(scores, sources, unflagged) == 12
    assert verification_bar(scores, sources, np.ones(4, dtype=bool)) == 30
    assert verification_bar(scores, sources, np.zeros(4, dtype=bool)) == 30   # nothing kept: every window
    assert verification_bar([], [], unflagged) == -1
