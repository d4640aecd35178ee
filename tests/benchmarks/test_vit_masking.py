"""vit_masking.py: the localisation of candidate windows against the trigger boxes."""

from __future__ import annotations

import numpy as np
import torch

from poisonscan.runtime import Runtime
from benchmarks.studies.vit_masking import localisation, rt_precision


def test_localisation_iou_catch_and_overlap() -> None:
    truth = np.array([[0, 0, 8, 8], [0, 0, 8, 8], [0, 0, 8, 8]])
    boxes = np.array([[0, 0, 8, 8],                                   # the trigger itself
                      [4, 0, 8, 8],                                   # half of it: IoU 32 / 96
                      [16, 16, 8, 8]])                                # elsewhere
    got = localisation(boxes, truth)
    assert got == {"iou": round((1 + 32 / 96) / 3, 3), "catch": round(2 / 3, 3), "any_overlap": round(2 / 3, 3)}


def test_precision_is_recorded_by_name() -> None:
    assert rt_precision(Runtime(torch.device("cpu"), None)) == "fp32"
    assert rt_precision(Runtime(torch.device("cpu"), torch.bfloat16)) == "bfloat16"
