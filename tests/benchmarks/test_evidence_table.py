"""The evidence table over recorded runs: flip-set sizes from each record kind, the effect, the gate, dedup."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("evidence_table", ROOT / "benchmarks" / "evidence_table.py")
evidence_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(evidence_table)


def _ev(z: float, top: float, null: float, found: bool, **kw: object) -> dict:
    return {"z": z, "topk_median": top, "null_median": null, "backdoor_found": found, **kw}


def test_table_reads_summaries_pipeline_rows_and_run_folders(tmp_path: Path) -> None:
    # a detect summary (flip set in clusters), copied again into a pipeline result (flip set from the top-k)
    summary = {"command": "detect", "clusters": {"flip_set": 189}, "evidence": _ev(3.84, 81.5, 75.0, True),
               "top_k": [{"poison_score": 105}]}
    (tmp_path / "a-summary.json").write_text(json.dumps(summary))
    pipeline = {"detection": {
        "poisoncam": {"evidence": _ev(3.84, 81.5, 75.0, True, best_flip_share=105 / 189),
                      "top_k": [{"poison_score": 105}]},
        "patchsearch": {"evidence": _ev(1.5, 73.0, 69.0, False, best_flip_share=0.5),
                        "top_k": [{"poison_score": 50}]}}}
    (tmp_path / "b.json").write_text(json.dumps(pipeline))
    demo = {"command": "demo", "evidence": _ev(10.8, 65.5, 45.0, True),
            "threat_model": {"oracle_flips": {"flip_set": 100}}}
    (tmp_path / "c-demo.json").write_text(json.dumps(demo))
    run = tmp_path / "run"                                    # a run folder: evidence.json carries n_flip
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"evidence": _ev(5.2, 81.5, 70.0, False)}))
    (run / "evidence.json").write_text(json.dumps({**_ev(5.2, 81.5, 70.0, False), "n_flip": 189}))
    (tmp_path / "not-a-run.json").write_text(json.dumps([1, 2]))

    rows = evidence_table.table(sorted(tmp_path.glob("*.json")) + [run], 3.0, 0.15)
    by_run = {Path(r["run"].split(":")[0].rstrip("*")).name + (":" + r["run"].split(":")[1] if ":" in r["run"]
                                                              else ""): r for r in rows}
    assert set(by_run) == {"a-summary.json", "b.json:patchsearch", "c-demo.json", "run"}   # b's poisoncam = a's
    clean = by_run["a-summary.json"]
    assert clean["n_flip"] == 189 and clean["effect"] == pytest.approx(6.5 / 114)
    assert clean["found_then"] is True and clean["found_now"] is False and "minimum effect" in clean["reason"]
    assert by_run["b.json:patchsearch"]["n_flip"] == 100 and not by_run["b.json:patchsearch"]["found_now"]
    demo_row = by_run["c-demo.json"]
    assert demo_row["run"].endswith("*") and demo_row["effect"] == pytest.approx(20.5 / 55) and demo_row["found_now"]
    assert by_run["run"]["effect"] == pytest.approx(11.5 / 119) and not by_run["run"]["found_now"]
    # a looser effect bar lets the clean-model record through on z alone
    assert any(r["found_now"] for r in evidence_table.table([tmp_path / "a-summary.json"], 3.0, 0.0))


def test_run_folder_with_raw_scores_is_rescaled_and_the_null_is_named(tmp_path: Path) -> None:
    """An old evidence.json (std-scaled z, null from every image) is rescaled from its own scores; a new summary
    says where its null came from."""
    import numpy as np

    from poisonscan.detect.evidence import backdoor_evidence

    rng = np.random.default_rng(0)
    null = np.r_[np.clip(rng.normal(55, 25, size=254).round(), 0, 135), 197.0, 198.0]
    topk = np.full(20, 210.0)
    today = backdoor_evidence(topk, null, n_scored=2028, n_flip=250, seed=2)
    old = {k: v for k, v in today.items() if k not in ("z_scale", "boot_scale", "effect")}
    old.update(z=1.2, topk_scores=topk.tolist(), null_scores=null.tolist(), n_flip=250, backdoor_found=False)
    run = tmp_path / "old"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"evidence": {**old, "null_scores": None}}))
    (run / "evidence.json").write_text(json.dumps(old))
    (run / "config.json").write_text(json.dumps({"seed": 2}))
    new = {"command": "detect", "clusters": {"flip_set": 250},
           "evidence": _ev(10.3, 210.0, 117.0, True, null_pool="outside-topk-clusters", z_scale="central68")}
    (tmp_path / "new-summary.json").write_text(json.dumps(new))
    rows = {Path(r["run"]).name: r for r in evidence_table.table([run, tmp_path / "new-summary.json"], 3.0, 0.15)}
    assert rows["old"]["z"] == pytest.approx(today["z"]) and rows["old"]["z"] >= 3 and rows["old"]["found_now"]
    assert rows["old"]["null_pool"] == "all" and rows["old"]["z_scale"] == "central68"
    assert rows["old"]["found_then"] is False
    assert rows["new-summary.json"]["null_pool"] == "outside-topk-clusters" and rows["new-summary.json"]["found_now"]
