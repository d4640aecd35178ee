"""docs/results.md is generated from the decision records, and says each run's threat-model strength and reason."""

from __future__ import annotations

import json

from benchmarks import results_page


def _record(name: str, role: str, found: bool, **kw: object) -> dict:
    rec = {"name": name, "setting": "a | setting", "role": role, "commands": [f"poisonscan detect --out {name}"],
           "threat_model": {"knn_asr": 0.283, "clean_rate": 0.0147, "knn_accuracy": 0.157}, "z": 5.71, "effect": 0.131,
           "recurrence": {"size": 13, "k": 20, "p_value": 0.001, "null_group_p99": 5.0, "poisons_in_group": 13,
                          "poisons_in_top_k": 13},
           "decision": {"backdoor_found": found, "reason": "backdoor signal: z = 5.71", "removed": 505,
                        "scanned": 49980, "recall": 0.99, "precision": 0.95},
           "effect_bar": {"backdoor_found": False}}
    rec.update(kw)
    return rec


def test_rows_give_strength_evidence_decision_and_commands(tmp_path) -> None:
    page = results_page.render([_record("b-held", "held-out", True, version=results_page.__version__),
                                _record("a-tuned", "tuned", False, threat_model=None, version="0.1.0")])
    assert f"1 of the 2 runs were decided by this release ({results_page.__version__})" in page
    assert page.index("**a-tuned**") < page.index("**b-held**")              # tuned settings first
    held = next(line for line in page.splitlines() if line.startswith("| **b-held**"))
    assert "a / setting" in held                                              # a pipe in a cell cannot break the table
    assert "28.3% (1.5%, 19.3x)" in held and "| 5.71 | 13.1% |" in held
    assert "13 of 20 (5), p 0.001; poisons: 13 in it, 13 in the top-k" in held
    assert "found, 505 of 49,980 removed | 99.0% | 95.0% | no signal |" in held
    tuned = next(line for line in page.splitlines() if line.startswith("| **a-tuned**"))
    assert "| tuned | 0.1.0 | - |" in tuned and "no signal, 505 removed" in tuned
    assert "- **b-held**: backdoor signal: z = 5.71." in page and "  `poisonscan detect --out b-held`" in page
    held_test = {"size": 2, "k": 20, "p_value": 1e-9, "null_group_p99": 0.021, "holders": 123, "gap": 0.288}
    line = results_page.row(_record("c", "held-out", True, held_recurrence=held_test))
    assert ("p 0.001; poisons: 13 in it, 13 in the top-k; held: gap 0.29 (random 0.02), p < 0.001, 2 windows, "
            "123 holders") in line

    folder, speed = tmp_path / "records", tmp_path / "speed"
    folder.mkdir()
    speed.mkdir()
    (folder / "x.json").write_text(json.dumps(_record("x", "held-out", True)))
    out = tmp_path / "results.md"
    args = ["--records", str(folder), "--speed", str(speed), "--out", str(out)]
    assert results_page.main(args + ["--check"]) == 1
    assert results_page.main(args) == 0
    assert results_page.main(args + ["--check"]) == 0
    assert "The exact and the fast path" not in out.read_text()                 # no speed records, no section


def test_the_speed_rows_give_both_paths() -> None:
    side = {"forwards": {"total": 398592}, "seconds": 253.5, "z": 25.0, "removed": 250, "recall": 1.0,
            "precision": 1.0}
    rec = {"name": "demo", "setting": "5,000 images", "threat_model": None, "exact": side,
           "fast": {**side, "forwards": {"total": 246336}, "seconds": 182.5, "z": 18.0},
           "forwards_ratio": 398592 / 246336, "removed_difference": {"only_exact": [], "only_fast": []}}
    page = results_page.render_speed([rec])
    line = next(line for line in page.splitlines() if line.startswith("| **demo**"))
    assert "398,592 -> 246,336 (1.62x)" in line and "254 -> 182" in line and "25.00 / 18.00" in line
    assert "250 / 250 (0, 0)" in line and "100.0% / 100.0%; 100.0% / 100.0%" in line


def test_the_stage_rows_give_both_settings() -> None:
    a = {"settings": {"classifier.train": "always"}, "stage_seconds": {"match": 0.9, "classifier": 89.5,
                                                                        "outputs": 0.1},
         "removed": 250, "recall": 1.0, "precision": 1.0}
    rec = {"name": "demo-classifier", "setting": "5,000 images", "threat_model": None, "from_stage": "match", "a": a,
           "b": {**a, "settings": {"classifier.train": "unless-matched"},
                 "stage_seconds": {"match": 0.7, "classifier": 0.0, "outputs": 0.0}},
           "removed_difference": {"only_a": [], "only_b": ["x"]}, "note": "on one machine"}
    page = results_page.render_stages([rec])
    line = next(line for line in page.splitlines() if line.startswith("| **demo-classifier**"))
    assert "`classifier.train = always` / `classifier.train = unless-matched`" in line
    assert "match 0.9 / 0.7, classifier 89.5 / 0.0 |" in line and "250 / 250 (0, 1)" in line
    assert "- **demo-classifier**: on one machine." in page and results_page.render_stages([]) == ""


def test_the_results_page_is_what_the_records_give() -> None:
    assert results_page.main(["--check"]) == 0, "run python benchmarks/results_page.py"
