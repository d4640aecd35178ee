"""Terminal summary, plain JSON output and the generic table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from poisonscan.report.summary import (format_seconds, format_value, print_detect_summary, print_json, print_table,
                                       to_jsonable)


def _console() -> Console:
    return Console(record=True, width=160, color_system=None, force_terminal=False)


def test_detect_summary_shows_every_section(fake_run) -> None:
    console = _console()
    print_detect_summary(fake_run.summary, console)
    out = console.export_text()
    for text in ("poisonscan detect (poisoncam)", "Overview", "scanned", "removed", "5  (20.83% of scanned)",
                 "unreadable", "Evidence", "backdoor found", "yes", "9.5", "Top clusters", "Top-3 candidate triggers",
                 fake_run.xss_alert, "(20, 4, 8, 8)", "Timings", "classifier", "12.0 s", "total", "17.9 s", "Files",
                 str(Path(fake_run.summary["run_dir"]) / "scores.csv"), "--fail-on 1: exit code 1"):
        assert text in out, text


def test_evidence_says_where_the_null_came_from(fake_run) -> None:
    for extra, text in (({}, "from all images"),
                        ({"null_pool": "outside-topk-clusters", "null_excluded_clusters": [3, 8]},
                         "from images outside the top-k's 2 clusters")):
        summary = dict(fake_run.summary, evidence={**fake_run.summary["evidence"], **extra})
        console = _console()
        print_detect_summary(summary, console)
        assert text in console.export_text()


def test_evidence_gives_both_recurrence_tests(fake_run) -> None:
    group = {"size": 9, "k": 20, "p_value": 0.001, "null_group_p99": 5.0}
    summary = dict(fake_run.summary, evidence={**fake_run.summary["evidence"], "max_recurrence_p": 0.01,
                                               "recurrence": {**group, "size": 5, "p_value": 0.027},
                                               "feature_recurrence": group})
    console = _console()
    print_detect_summary(summary, console)
    out = console.export_text()
    assert "5 of the top 20 windows show one picture  (random windows: up to 5; p = 0.027, maximum 0.01)" in out
    assert ("9 of the top 20 windows look alike to the threat model  (windows the search picks in random images: "
            "up to 5; p = 0.001, maximum 0.01)") in out
    console = _console()
    print_detect_summary(dict(summary, evidence={**summary["evidence"], "feature_recurrence": None}), console)
    assert "feature recurrence" in console.export_text()        # the row stays, with "-"
    held = {"size": 2, "k": 20, "p_value": 0.0, "null_group_p99": 0.021, "holders": 123, "gap": 0.2876}
    console = _console()
    print_detect_summary(dict(summary, evidence={**summary["evidence"], "held_recurrence": held}), console)
    assert ("2 of the top 20 windows show a picture many images of the data set hold (held by 123 images; largest "
            "gap 0.288) (random windows' pictures' gaps: up to 0.021; p < 0.001, maximum 0.01)") in \
        " ".join(console.export_text().split())
    response = {"pairs": 64, "wins": 31, "losses": 3, "holders_mean": 1.2, "others_mean": 0.3, "p_value": 3.8e-7}
    console = _console()
    print_detect_summary(dict(summary, evidence={**summary["evidence"], "held_recurrence": held,
                                                 "held_response": response}), console)
    assert ("copies from 64 holders against alike windows of their clusters: 31 moved more of the flip set, 3 fewer "
            "(p < 0.001)") in " ".join(console.export_text().split())


def test_ids_are_not_parsed_as_markup(fake_run) -> None:
    summary = dict(fake_run.summary)
    summary["top_k"] = [dict(summary["top_k"][0], id=fake_run.markup_id)]
    console = _console()
    print_detect_summary(summary, console)
    assert fake_run.markup_id in console.export_text()


def test_partial_summary_and_no_evidence() -> None:
    console = _console()
    print_detect_summary({"method": "patchsearch", "counts": {"scanned": 10, "removed": 0},
                          "evidence": {"backdoor_found": False, "z": float("nan")}}, console)
    out = console.export_text()
    assert "patchsearch" in out and "backdoor found" in out and "no" in out
    assert "Top-" not in out and "Timings" not in out


def test_top_k_is_cut_with_a_note(fake_run) -> None:
    console = _console()
    print_detect_summary(fake_run.summary, console, max_top=2)
    out = console.export_text()
    assert "1 more in scores.csv" in out


def test_print_json_is_strict_plain_json(capsys) -> None:
    obj = {"a": np.int64(3), "b": np.float32(0.5), "c": float("nan"), "d": Path("x/y"), "e": np.arange(3),
           "f": {"[bold]": True}, "g": float("inf"), "h": object.__new__(type("Thing", (), {}))}
    print_json(obj)
    out = capsys.readouterr().out
    parsed = json.loads(out)
    assert parsed["a"] == 3 and parsed["b"] == 0.5 and parsed["c"] is None and parsed["g"] is None
    assert parsed["d"] == "x/y" and parsed["e"] == [0, 1, 2] and parsed["f"] == {"[bold]": True}
    assert isinstance(parsed["h"], str)
    assert "\x1b[" not in out


def test_to_jsonable_handles_surrogates() -> None:
    bad = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    text = json.dumps(to_jsonable({"id": bad}))
    assert "caf\\\\udce9.png" in text


def test_print_table_dicts_and_sequences() -> None:
    console = _console()
    print_table("Detection", [{"method": "poisoncam", "recall": 0.98765, "n": 1200},
                              {"method": "patchsearch", "precision": 0.5}], console)
    out = console.export_text()
    assert "Detection" in out and "0.9877" in out and "1,200" in out and "precision" in out and "-" in out
    console = _console()
    print_table("T", [("a", 1), ("b", 2), ("c", 3)], console, columns=["name", "value"], max_rows=2)
    out = console.export_text()
    assert "name" in out and "b" in out and "1 more rows not shown" in out
    with pytest.raises(ValueError):
        print_table("T", [("a", 1)], console)


@pytest.mark.parametrize(("seconds", "text"), [(0.421, "0.42 s"), (12.34, "12.3 s"), (185, "3 min 05 s"),
                                               (3725, "1 h 02 min"), (None, "-")])
def test_format_seconds(seconds, text) -> None:
    assert format_seconds(seconds) == text


def test_format_value() -> None:
    assert format_value(None) == "-" and format_value(True) == "yes" and format_value(1234) == "1,234"
    assert format_value([1, 2.5]) == "(1, 2.5)" and format_value(float("nan")) == "-"
