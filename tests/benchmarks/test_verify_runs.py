"""verify_runs.py: a finished run resumed with the verification in a copy, compared before and after."""

from __future__ import annotations

import json
from pathlib import Path

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import DetectConfig
from poisonscan.settings import configure
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from benchmarks.studies import verify_runs


def test_a_toy_run_verified_in_a_copy(tmp_path: Path, one_torch_thread) -> None:
    work = tmp_path / "work"
    poisoned = make_poisoned_folder(work / "data" / "train")
    ids = sorted(p.relative_to(work / "data" / "train").as_posix() for p in (work / "data" / "train").rglob("*.png"))
    (work / "data" / "ground_truth.csv").write_text(
        "sample_id,poisoned\n" + "".join(f"{i},{int(i in poisoned)}\n" for i in ids))
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    # neighbours over the whole data set: the consensus keeps every poison, so the verification has work to do
    cfg = configure(DetectConfig, data=str(work / "data" / "train"), model=str(model),
                    out=str(work / "detect-poisoncam"), clusters=4, masks=64, flip_size=40, top_k=5, null_size=64,
                    iterations=300, batch_size=128, device="cpu", precision="fp32", ensemble=1, neighbours=199,
                    refine_by="p", match_picture=False,      # the classifier's decision, verified
                    masking="exact", flip_testing="exact", null_testing="exact")   # the study's windows
    run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    original = (work / "detect-poisoncam" / "scores.csv").read_text()
    after = verify_runs.verified_run(work, 0.9)
    assert after == work / "detect-verify-0.9" and (after / "verify.json").is_file()
    assert (work / "detect-poisoncam" / "scores.csv").read_text() == original      # the original is untouched
    assert json.loads((work / "detect-poisoncam" / "verify.json").read_text())["n_candidates"] == 0     # off
    row = verify_runs.compare(work, after)
    assert row["before"]["removed"] == 0 and row["before"]["recall"] == 0
    # every confident poison verified (how many are confident moves with the CPU's float kernels: at 100 iterations
    # 7 to 19 of 20 on the machines seen, so the classifier trains 300)
    assert row["verified_poisons"] == row["candidate_poisons"] >= 15 and row["verified_clean"] <= 2
    assert row["after"]["removed"] == row["verified_poisons"] + row["verified_clean"]
    assert row["candidate_poisons"] == len(row["poison_flips"]) and row["environment"]["seed"] == 0
    text = verify_runs.table([row])
    assert text.splitlines()[2].startswith("| work | ") and f"| {row['bar']} |" in text
    mtime = (after / "summary.json").stat().st_mtime_ns
    assert verify_runs.verified_run(work, 0.9) == after and (after / "summary.json").stat().st_mtime_ns == mtime
    json.dumps(row)                                                                    # JSON-ready
