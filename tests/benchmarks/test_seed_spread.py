"""seed_spread.py: records grouped by setting, one run counted once, eval-detection figures first, today's gate."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks.studies import seed_spread


def _record(seed: int, work: str, removed: int, recall: float | None, precision: float | None, knn_asr: float,
            pair: str = "0=triggers/trigger_10.png", control: bool = False, **row: object) -> dict:
    evidence = {"z": 12.0, "topk_median": 200.0, "null_median": 100.0, "backdoor_found": True, "n_flip": 250}
    return {"config": "cifar10", "epochs": 15, "seed": seed, "rate": None if control else 0.5, "targets": [pair],
            "clean_control": control, "model": f"{work}/pretrain/encoder.safetensors",
            "threat_model": {"knn": {"asr": knn_asr}, "flips": {"changed_share": 0.9}},
            "detection": {"poisoncam": {"removed": removed, "recall": recall, "precision": precision,
                                        "evidence": evidence, **row}}}


def _eval(removed: int, recall: float, precision: float) -> dict:
    return {"command": "eval-detection", "removal": {"removed": removed, "recall": recall, "precision": precision}}


def test_groups_seeds_counts_a_run_once_and_prefers_the_resumed_scan(tmp_path: Path) -> None:
    w = lambda name, data: (tmp_path / name).write_text(json.dumps(data))   # noqa: E731
    w("a.json", _record(0, "w0", 2700, 0.998, 0.91, 0.80))
    w("a-eval-detection.json", _eval(2733, 0.9976, 0.9126))                   # the record's own eval wins
    w("a-retrain.json", _record(0, "w0", 2700, 0.998, 0.91, 0.80,           # the same run, resumed: counted once
                                retrained={"knn": {"asr": 0.055}}))
    w("a-seed1.json", _record(1, "w1", 0, 0.0, None, 0.84))                 # missed when first run ...
    w("a-seed1-rescaled-eval-detection.json", _eval(2795, 0.9992, 0.8937))  # ... found when resumed
    w("a-seed1-b-eval-detection.json", _eval(1, 0.0, 0.0))                   # belongs to a-seed1-b.json
    w("a-seed1-b.json", _record(1, "w9", 0, 0.0, None, 0.84, pair="3=triggers/trigger_12.png"))
    w("b.json", _record(0, "w2", 3000, 1.0, 0.83, 0.92, pair="9=triggers/trigger_14.png"))
    w("c.json", _record(0, "w3", 40, None, None, 0.10, control=True))
    c = json.loads((tmp_path / "c.json").read_text())                        # a clean model whose effect is small
    c["detection"]["poisoncam"]["evidence"].update(topk_median=105.0, null_median=100.0)
    w("c.json", c)
    w("not-a-record.json", [1, 2])

    groups = {g["setting"]: g for g in seed_spread.spread(sorted(tmp_path.glob("*.json")))}
    assert set(groups) == {"cifar10, 15 epochs, rate 0.5, trigger_10 -> 0",
                           "cifar10, 15 epochs, rate 0.5, trigger_12 -> 3",
                           "cifar10, 15 epochs, rate 0.5, trigger_14 -> 9",
                           "cifar10, 15 epochs, clean control, trigger_10 -> 0"}
    first = groups["cifar10, 15 epochs, rate 0.5, trigger_10 -> 0"]
    assert [r["seed"] for r in first["seeds"]] == [0, 1]
    s0, s1 = first["seeds"]
    assert (s0["removed"], s0["recall"], s0["source"], s0["retrained_knn_asr"]) == (2733, 0.9976, "eval-detection",
                                                                                     0.055)
    assert (s1["removed"], s1["recall"], s1["precision"]) == (2795, 0.9992, 0.8937)
    stats = first["stats"]
    assert stats["recall"]["mean"] == pytest.approx((0.9976 + 0.9992) / 2)
    assert stats["precision"]["std"] == pytest.approx(statistics.stdev([0.9126, 0.8937]))
    assert stats["retrained_knn_asr"] == {"n": 1, "mean": pytest.approx(0.055), "std": None}
    control = groups["cifar10, 15 epochs, clean control, trigger_10 -> 0"]["seeds"][0]
    assert control["removed"] == 0 and control["source"] == "gate"            # today's gate would remove nothing
    assert groups["cifar10, 15 epochs, rate 0.5, trigger_14 -> 9"]["seeds"][0]["source"] == "record"
    assert groups["cifar10, 15 epochs, rate 0.5, trigger_12 -> 3"]["seeds"][0]["removed"] == 1


def test_retrained_asr_reads_the_original_bank_and_drops_a_bank_without_the_target() -> None:
    own = {"k": 20, "asr": 0.0, "target_rate_clean": 0.0, "bank_target_count": 0}
    assert seed_spread._retrained_asr({"knn": own, "knn_original_bank": {"asr": 0.108}}) == 0.108
    assert seed_spread._retrained_asr({"knn": own}) is None                  # 0 by construction: left out
    older = {"k": 20, "asr": 0.0, "target_rate_clean": 0.0}                 # a record older than the count
    assert seed_spread._retrained_asr({"knn": older}) is None
    full = {"k": 20, "asr": 0.024, "target_rate_clean": 0.023, "bank_target_count": 480}
    assert seed_spread._retrained_asr({"knn": full}) == 0.024
    assert seed_spread._retrained_asr({}) is None


def test_main_prints_a_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_record(0, "w0", 2700, 0.998, 0.91, 0.80)))
    (tmp_path / "b.json").write_text(json.dumps(_record(1, "w1", 2600, 0.996, 0.95, 0.82)))
    monkeypatch.setattr("sys.argv", ["seed_spread.py", "--results", str(tmp_path)])
    seed_spread.main()
    out = capsys.readouterr().out
    assert "rate 0.5, trigger_10 -> 0" in out and "99.70%" in out and "sample std" in out
    monkeypatch.setattr("sys.argv", ["seed_spread.py", "--results", str(tmp_path), "--json"])
    seed_spread.main()
    data = json.loads(capsys.readouterr().out)
    assert data[0]["stats"]["removed"]["mean"] == pytest.approx(2650)


def test_a_run_rebuilt_in_its_work_directory_reads_as_its_newer_record(tmp_path: Path) -> None:
    old = _record(1, "w1", 2795, 0.9992, 0.8937, 0.83)
    old["environment"] = {"time": "2026-12-02T03:10:33+0000"}
    new = _record(1, "w1", 2700, 0.9988, 0.925, 0.83, retrained={"knn": {"asr": 0.03}})
    new["environment"] = {"time": "2026-12-03T01:00:00+0000"}
    for name, data in (("z-first.json", old), ("a-rebuild.json", new)):   # path order must not decide
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "z-first-eval-detection.json").write_text(json.dumps(_eval(2795, 0.9992, 0.8937)))
    (tmp_path / "a-rebuild-eval-detection.json").write_text(json.dumps(_eval(2700, 0.9988, 0.925)))
    (group,) = seed_spread.spread(sorted(tmp_path.glob("*.json")))
    (row,) = group["seeds"]
    assert (row["removed"], row["recall"], row["precision"], row["retrained_knn_asr"]) == (2700, 0.9988, 0.925, 0.03)
    (tmp_path / "a-rebuild-eval-detection.json").unlink()                  # a scan as it stands beats a bare record
    (row,) = seed_spread.spread(sorted(tmp_path.glob("*.json")))[0]["seeds"]
    assert (row["removed"], row["source"]) == (2795, "eval-detection")
    assert row["retrained_knn_asr"] is None         # retrained on the other scan's cleaned set: not this scan's


def test_a_rebuilt_scan_does_not_borrow_the_first_scans_retraining(tmp_path: Path) -> None:
    first = _record(0, "w0", 3030, 1.0, 0.825, 0.92, retrained={"knn": {"asr": 0.006}})
    first["environment"] = {"time": "2026-11-20T03:10:33+0000"}
    rebuilt = _record(0, "w0", 2664, 1.0, 0.938, 0.92)
    rebuilt["environment"] = {"time": "2026-12-03T06:41:00+0000"}
    (tmp_path / "b-retrain.json").write_text(json.dumps(first))
    (tmp_path / "b-rerun.json").write_text(json.dumps(rebuilt))
    (group,) = seed_spread.spread(sorted(tmp_path.glob("*.json")))
    (row,) = group["seeds"]
    assert (row["removed"], row["precision"], row["knn_asr"]) == (2664, 0.938, 0.92)
    assert row["retrained_knn_asr"] is None and group["stats"]["retrained_knn_asr"]["n"] == 0


def test_probe_asr_of_the_model_and_of_its_retraining_are_read_at_ten_percent_labels(tmp_path: Path) -> None:
    rec = _record(0, "w0", 2700, 0.998, 0.91, 0.80,
                  retrained={"knn": {"asr": 0.05}, "probe": {"0.01": {"asr": 0.18}, "0.1": {"asr": 0.129}}})
    rec["probe"] = {"no_defence@0.01": {"asr": 0.436}, "no_defence@0.1": {"asr": 0.497}}
    control = _record(0, "wc", 0, None, None, 0.10, control=True)
    control["probe"] = {"clean_data@0.01": {"asr": 0.153}, "clean_data@0.1": {"asr": 0.141}}
    (tmp_path / "a.json").write_text(json.dumps(rec))
    (tmp_path / "c.json").write_text(json.dumps(control))
    rows = {g["setting"]: g["seeds"][0] for g in seed_spread.spread(sorted(tmp_path.glob("*.json")))}
    run = rows["cifar10, 15 epochs, rate 0.5, trigger_10 -> 0"]
    assert (run["probe_asr"], run["retrained_probe_asr"]) == (0.497, 0.129)
    clean = rows["cifar10, 15 epochs, clean control, trigger_10 -> 0"]
    assert (clean["probe_asr"], clean["retrained_probe_asr"]) == (0.141, None)
    assert seed_spread._probe_asr({"no_defence@0.01": {"asr": 0.4}}) is None    # no 10%-label probe recorded
