"""stage_ab.py: one finished run resumed from one stage with two settings, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.benchmarks.toy_runs import finished_toy_run
from tests.detect.detect_toys import one_torch_thread  # noqa: F401

from benchmarks import stage_ab


def test_the_classifier_trained_or_not_on_one_run_from_its_match(tmp_path: Path, one_torch_thread, monkeypatch,
                                                                 capsys) -> None:
    run, _, truth = finished_toy_run(tmp_path, masks=64)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["stage_ab", "--run", str(run), "--work", str(tmp_path / "work"), "--name",
                                      "toy", "--from", "match", "--a", "classifier.train=always", "--b",
                                      "classifier.train=unless-matched", "--truth", str(truth), "--out", str(out)])
    stage_ab.main()
    rec = json.loads(out.read_text())
    a, b = rec["a"], rec["b"]
    assert a["settings"] == {"classifier.train": "always"} and a["classifier_trained"] and not b["classifier_trained"]
    assert b["classifier_skipped"].startswith("the picture match makes the removal")
    assert set(a["stage_seconds"]) == {"match", "classifier", "verify", "outputs"}     # from the match stage on
    assert a["removed"] == b["removed"] == 20 and rec["removed_difference"] == {"only_a": [], "only_b": []}
    assert a["recall"] == b["recall"] == 1.0 and a["forwards"]["match"] == 0
    for side in ("a", "b"):                          # the earlier stages' records reused, not recomputed
        assert (tmp_path / "work" / side / "search.json").read_bytes() == before[run / "search.json"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    text = capsys.readouterr().out
    assert "s classifier" in text and "removed only by a 0, only by b 0" in text
