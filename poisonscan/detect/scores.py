"""``scores.csv``, the per-sample table of a detect run: its columns, defined once, and its reader.

The pipeline writes the columns in :data:`SCORE_COLUMNS` order; :func:`read_scores` parses them into arrays (every
number as float64 with NaN for an empty cell, ``removed`` as bool); docs/outputs.md documents the same columns (a
test keeps the page and :data:`SCORE_TABLE` equal).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from poisonscan.errors import DataError


@dataclass(frozen=True)
class Column:
    """One column of ``scores.csv``: its name, ``kind`` (``int``, ``float``, ``str`` or ``bool``) and meaning."""

    name: str
    kind: str
    meaning: str


SCORE_TABLE: tuple[Column, ...] = (
    Column("index", "int", "row of the store (0-based)"),
    Column("id", "str", "the sample id"),
    Column("label", "str", "the source's label; empty when unknown"),
    Column("cluster", "int", "k-means cluster"),
    Column("cluster_distance", "float", "distance to the cluster's centroid"),
    Column("poison_score", "int", "flip-set images the image's candidate window moves; empty when not scored"),
    Column("box_x", "int", "candidate window, left; empty when not scored"),
    Column("box_y", "int", "candidate window, top"),
    Column("box_w", "int", "candidate window, width"),
    Column("box_h", "int", "candidate window, height"),
    Column("classifier_prob", "float", "the poison classifier's probability P; empty when no classifier ran"),
    Column("neighbour_prob", "float", "mean P of the sample's feature-space neighbours; empty without them"),
    Column("removal_score", "float", "P averaged with the neighbours' support; removed when above the threshold"),
    Column("verify_flips", "int", "poison score of the window the classifier looks at, when it was flip-tested"),
    Column("picture_match", "float", "similarity of the best window to the recurring picture, when searched for"),
    Column("removed", "bool", "1 when the sample is in removed.txt, else 0"),
    Column("top_k_rank", "int", "1..k for the poison set, else empty"),
)
SCORE_COLUMNS = tuple(c.name for c in SCORE_TABLE)
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")


@dataclass
class ScoreTable:
    """``scores.csv`` as arrays: ``ids``, ``labels`` and one float64 array per numeric column (NaN: empty, or a
    column the file lacks; ``columns`` lists those it has), ``removed`` as bool."""

    path: Path
    ids: list[str]
    labels: list[str]
    values: dict[str, np.ndarray]
    columns: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, column: str) -> np.ndarray:
        return self.values[column]

    @property
    def removed(self) -> np.ndarray:
        return self.values["removed"].astype(bool)

    @property
    def boxes(self) -> np.ndarray:
        """float N x 4 ``(x, y, w, h)``, NaN where the image was not scored."""
        return np.stack([self.values[c] for c in BOX_COLUMNS], axis=1)


def _number(cell: str, column: str, where: str) -> float:
    cell = cell.strip()
    if cell == "":
        return math.nan
    if column == "removed":
        return 1.0 if cell in ("1", "true", "True") else 0.0
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{where}: {column} {cell!r} is not a number") from None


def read_scores(path: Path | str, required: tuple[str, ...] = SCORE_COLUMNS) -> ScoreTable:
    """Parse ``scores.csv``; ``DataError`` when it cannot be read or lacks one of ``required``. Columns it lacks
    beyond those are NaN."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
            columns = reader.fieldnames
    except FileNotFoundError:
        raise DataError(f"scores table {path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read scores table {path}: {exc}") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"scores table {path} lacks column(s) {', '.join(missing)} "
                        f"(has: {', '.join(columns) or 'none'})")
    values = {}
    for col in SCORE_TABLE:
        if col.kind == "str":
            continue
        values[col.name] = np.array([_number(r.get(col.name) or "", col.name, str(path)) for r in rows],
                                    dtype=np.float64)
    return ScoreTable(path, [r.get("id", "") for r in rows], [r.get("label") or "" for r in rows], values,
                      list(columns))
