"""The scores.csv schema: one definition, the same columns on docs/outputs.md, a reader that refuses bad cells."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from poisonscan.detect.scores import SCORE_COLUMNS, SCORE_TABLE, read_scores
from poisonscan.errors import DataError

OUTPUTS = Path(__file__).resolve().parents[2] / "docs" / "outputs.md"


def test_the_docs_table_lists_exactly_the_columns() -> None:
    text = OUTPUTS.read_text(encoding="utf-8")
    section = text[text.index("### `scores.csv`"):]
    section = section[:section.index("```")]
    documented = [name for row in re.findall(r"^\| (`[^|]+`) \|", section, re.M)
                  for name in re.findall(r"`(\w+)`", row)]
    assert documented == list(SCORE_COLUMNS)
    assert all(c.kind in ("int", "float", "str", "bool") and c.meaning for c in SCORE_TABLE)


def test_read_scores_parses_empty_cells_as_nan_and_refuses_text(tmp_path: Path) -> None:
    path = tmp_path / "scores.csv"
    header = ",".join(SCORE_COLUMNS)
    row = "0,a.png,cat,3,0.5,12,1,2,9,9,0.9,,0.9,,,1,1"
    empty = "1,b.png,,3,0.25,,,,,,,,,,,0,"
    path.write_text(f"{header}\n{row}\n{empty}\n")
    table = read_scores(path)
    assert table.ids == ["a.png", "b.png"] and table.labels == ["cat", ""]
    assert table.removed.tolist() == [True, False] and table["poison_score"][0] == 12
    assert np.isnan(table["poison_score"][1]) and np.isnan(table.boxes[1]).all()
    path.write_text(f"{header}\n" + row.replace(",12,", ",twelve,") + "\n")
    with pytest.raises(DataError, match="poison_score 'twelve' is not a number"):
        read_scores(path)
    path.write_text("index,id\n0,a\n")
    with pytest.raises(DataError, match="lacks column"):
        read_scores(path)
    with pytest.raises(DataError, match="not found"):
        read_scores(tmp_path / "none.csv")


def test_the_summary_keys_are_the_documented_ones() -> None:
    from poisonscan.detect.outputs import SUMMARY_KEYS

    text = OUTPUTS.read_text(encoding="utf-8")
    section = text[text.index("### `summary.json`"):text.index("### `scores.csv`")]
    documented = [name for row in re.findall(r"^\| (`[^|]+`) \|", section, re.M)
                  for name in re.findall(r"`(\w+)`", row)]
    assert documented == list(SUMMARY_KEYS)
