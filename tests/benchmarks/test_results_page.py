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
    page = results_page.render([_record("b-held", "held-out", True), _record("a-tuned", "tuned", False,
                                                                            threat_model=None)])
    assert page.index("**a-tuned**") < page.index("**b-held**")              # tuned settings first
    held = next(line for line in page.splitlines() if line.startswith("| **b-held**"))
    assert "a / setting" in held                                              # a pipe in a cell cannot break the table
    assert "28.3% (1.5%, 19.3x)" in held and "| 5.71 | 13.1% |" in held
    assert "13 of 20 (5), p 0.001; poisons: 13 in it, 13 in the top-k" in held
    assert "found, 505 of 49,980 removed | 99.0% | 95.0% | no signal |" in held
    tuned = next(line for line in page.splitlines() if line.startswith("| **a-tuned**"))
    assert "| tuned | - |" in tuned and "no signal, 505 removed" in tuned
    assert "- **b-held**: backdoor signal: z = 5.71." in page and "  `poisonscan detect --out b-held`" in page

    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "x.json").write_text(json.dumps(_record("x", "held-out", True)))
    out = tmp_path / "results.md"
    assert results_page.main(["--records", str(folder), "--out", str(out), "--check"]) == 1
    assert results_page.main(["--records", str(folder), "--out", str(out)]) == 0
    assert results_page.main(["--records", str(folder), "--out", str(out), "--check"]) == 0


def test_the_results_page_is_what_the_records_give() -> None:
    assert results_page.main(["--check"]) == 0, "run python benchmarks/results_page.py"
