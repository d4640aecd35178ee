"""Reading older detect runs' evidence records in today's terms (benchmarks/studies/record_compat.py)."""

from __future__ import annotations


import numpy as np
import pytest

from poisonscan.detect.evidence import backdoor_evidence, evidence_z
from benchmarks.studies import record_compat

upgrade = record_compat.upgrade_record

TRIGGER_TOPK = np.array([221, 217, 215, 214, 213, 213, 212, 212, 210, 210, 210, 210, 209, 208, 208, 208, 208, 207,
                         207, 207], dtype=np.float64)                  # the measured CIFAR-10 trigger_12 run


def test_old_records_are_rescaled_from_their_scores() -> None:
    old = {"z": 1.2, "topk_median": 210.0, "null_median": 196.0, "n_flip": 250, "boot_std": 15.0,
           "topk_scores": TRIGGER_TOPK.tolist()}
    up = upgrade(old)
    assert up["z"] == pytest.approx(evidence_z(TRIGGER_TOPK, 196, 15.0)) and up["z_scale"] == "min-spread"
    assert old["z"] == 1.2 and up["effect"] == pytest.approx(14 / 54)
    summary = {"z": 1.2, "topk_median": 210.0, "null_median": 196.0, "n_flip": 250}      # no scores: kept
    assert upgrade(summary)["z"] == 1.2 and "z_scale" not in upgrade(summary)
    today = backdoor_evidence(TRIGGER_TOPK, np.arange(100.0), n_scored=2028, n_flip=250)
    assert upgrade({**today, "z": 99.0})["z"] == 99.0                             # today's records as written
    bare = upgrade({"z": 5.0, "topk_median": 105.0, "null_median": 69.0, "n_flip": 189})
    assert bare["z"] == 5.0 and bare["effect"] == pytest.approx(0.3)
