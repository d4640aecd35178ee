"""decision_records.py: one finished run's record names its release, evidence, decision and removal quality."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks.toy_runs import finished_toy_run
from tests.detect.detect_toys import one_torch_thread  # noqa: F401

from benchmarks import decision_records, results_page
from poisonscan import __version__


def test_a_record_names_the_release_that_decided_and_the_removal(tmp_path: Path, one_torch_thread) -> None:
    run, poisoned, truth = finished_toy_run(tmp_path, masks=64)
    rec = decision_records.row("toy", run, str(truth), None, "toy data", "held-out", ["poisonscan detect ..."])
    assert rec["version"] == __version__ and rec["run"] == str(run) and rec["threat_model"] is None
    d = rec["decision"]
    assert d["backdoor_found"] and d["removed"] == len(poisoned) == 20 and d["recall"] == d["precision"] == 1.0
    assert rec["recurrence"]["poisons_in_top_k"] == 5 and rec["recurrence"]["k"] == 5
    line = results_page.row(rec)
    assert line.startswith("| **toy**: toy data | held-out | " + __version__ + " | - |")
    assert "found, 20 of" in line and "| 100.0% | 100.0% |" in line
