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


def test_a_cnn_compares_coarse_to_fine_with_the_papers_masks() -> None:
    """A CNN threat model gets two modes: coarse-to-fine and the paper's B full-coverage masks, each giving a box."""
    from benchmarks.studies.vit_masking import masking_modes
    from poisonscan.detect.clustering import Clustering
    from tests.detect.detect_toys import toy_encoder

    enc = toy_encoder(16)
    centroids = np.eye(4, enc.feature_dim, dtype=np.float32)
    clustering = Clustering(centroids, np.zeros(4, np.int64), np.zeros(4, np.float32))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    modes = masking_modes(enc, clustering, images, 5, 0, Runtime(torch.device("cpu"), None))
    assert [m[1] for m in modes] == [modes[0][1], 256] and "coarse-to-fine" in modes[0][0]
    for _, _, run in modes:
        boxes = run()[1]
        assert boxes.shape == (2, 4) and bool((boxes[:, 2:] == 5).all())
