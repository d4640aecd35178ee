"""The evidence table over recorded runs: flip-set sizes from each record kind, the effect, the gate, dedup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.studies import evidence_table


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
    assert any(r["found_now"] for r in evidence_table.table([tmp_path / "a-summary.json"], 3.0, 0.0,
                                                            recorded_min_effect=0.0))


def test_old_records_get_today_z_from_their_scores_and_the_null_is_named(tmp_path: Path) -> None:
    """An old evidence.json (bootstrap-scaled z) gets today's z; a summary without scores keeps its own; a new
    summary says where its null came from."""
    from poisonscan.detect.evidence import evidence_z

    topk = [221, 217, 215, 214, 213, 213, 212, 212, 210, 210, 210, 210, 209, 208, 208, 208, 208, 207, 207, 207]
    old = {"z": 1.2, "topk_median": 210.0, "null_median": 196.0, "n_flip": 250, "topk_scores": topk,
           "boot_std": 15.0, "backdoor_found": False}
    run = tmp_path / "old"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"evidence": {k: v for k, v in old.items() if k != "topk_scores"}}))
    (run / "evidence.json").write_text(json.dumps(old))
    raw = {"run": "x", "config": {"seed": 0}, "evidence": {**old, "topk_median": 211.0, "null_median": 190.0}}
    (tmp_path / "raw-evidence.json").write_text(json.dumps(raw))
    bare = {"command": "detect", "clusters": {"flip_set": 100}, "evidence": _ev(5.18, 74.0, 46.0, True)}
    (tmp_path / "bare-summary.json").write_text(json.dumps(bare))
    new = {"command": "detect", "clusters": {"flip_set": 250},
           "evidence": _ev(25.1, 210.0, 117.0, True, null_pool="outside-topk-clusters", z_scale="min-spread")}
    (tmp_path / "new-summary.json").write_text(json.dumps(new))
    paths = [run] + sorted(tmp_path.glob("*.json"))
    rows = {Path(r["run"]).name: r for r in evidence_table.table(paths, 3.0, 0.15)}
    assert rows["old"]["z"] == pytest.approx(evidence_z(topk, 196.0, 15.0)) and rows["old"]["z"] >= 3
    assert rows["old"]["found_now"] and rows["old"]["found_then"] is False and rows["old"]["z_scale"] == "min-spread"
    assert rows["raw-evidence.json"]["z"] == pytest.approx(evidence_z(topk, 190.0, 15.0))   # median of the scores
    assert rows["bare-summary.json"]["z"] == 5.18 and rows["bare-summary.json"]["z_scale"] == "std"
    assert rows["old"]["null_pool"] == "all" and rows["new-summary.json"]["null_pool"] == "outside-topk-clusters"
    assert rows["new-summary.json"]["z"] == 25.1 and rows["new-summary.json"]["found_now"]
