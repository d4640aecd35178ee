"""null_noise.py: a pooled null scored on a copy of the run, and the evidence test redone on subsets of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import DetectConfig
from poisonscan.settings import configure
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from benchmarks.studies import null_noise


def _record(null: np.ndarray, topk: list[float]) -> dict:
    return {"null_scores": null.tolist(), "topk_scores": topk, "n_scored": 200, "n_flip": 100}


def test_redraws_pass_a_clear_gap_and_never_a_missing_one() -> None:
    null = np.random.default_rng(0).integers(20, 40, 600).astype(float)
    strong = null_noise.redraws(_record(null, [90.0 + i % 3 for i in range(10)]), [64, 256], 25, 3.0, 0.15)
    weak = null_noise.redraws(_record(null, [39.0] * 10), [64, 256], 25, 3.0, 0.15)
    assert set(strong) == {"64", "256"} and strong["256"]["draws"] == 25
    assert strong["64"]["found_share"] == strong["256"]["found_share"] == 1.0
    assert weak["64"]["found_share"] == weak["256"]["found_share"] == 0.0
    for s in strong.values():
        assert 20 <= s["null_median"]["q05"] <= s["null_median"]["q50"] <= s["null_median"]["q95"] <= 40
        assert s["effect"]["min"] > 0.5


def test_larger_nulls_spread_less() -> None:
    """A null with a rare high tail (a few windows cut from poisons): its top-k median jumps with the draw."""
    rng = np.random.default_rng(1)
    null = np.concatenate([rng.integers(100, 140, 4000), rng.integers(180, 200, 96)]).astype(float)
    out = null_noise.redraws(_record(null, [150.0 + i for i in range(10)]), [64, 1024], 60, 3.0, 0.15)
    assert out["1024"]["null_median"]["std"] < out["64"]["null_median"]["std"]


def test_study_scores_a_pool_on_a_copy_and_leaves_the_run(tmp_path: Path, one_torch_thread) -> None:
    poisoned = make_poisoned_folder(tmp_path / "data")
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    truth = tmp_path / "truth.csv"
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},1\n" for i in poisoned))
    run = tmp_path / "run"
    cfg = configure(DetectConfig, data=str(tmp_path / "data"), model=str(model), out=str(run), clusters=4, masks=64,
                    flip_size=40, top_k=5, null_size=32, iterations=20, batch_size=128, device="cpu",
                    precision="fp32")
    run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    before = (run / "evidence.json").read_bytes()
    (tmp_path / "scratch").mkdir()
    row = null_noise.study(run, 96, [16, 32], 10, tmp_path / "scratch", truth)
    assert (run / "evidence.json").read_bytes() == before                # the run itself is untouched
    assert len(json.loads(before)["null_scores"]) == 32
    assert row["pool"] == 96 and set(row["sizes"]) == {"16", "32"} and row["recorded"]["null_size"] == 32
    assert 0 < row["pool_from_poisons"] < 96                             # the toy's poisons are a share of its images
    assert row["k"] == 5 and row["n_flip"] == 40
    copy = json.loads((tmp_path / "scratch" / "run" / "evidence.json").read_text())
    assert copy["null_size"] == 96 and copy["topk_scores"] == json.loads(before)["topk_scores"]
    null_noise.print_table([row])
