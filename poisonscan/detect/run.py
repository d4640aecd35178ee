"""A detect run folder read from Python: :class:`DetectRun` (``poisonscan.scan`` runs one and returns it).

    import poisonscan
    run = poisonscan.scan("data/train", "encoder.safetensors", out="runs/detect/scan1", masks=64)
    run.verdict, run.removed[:5], run.scores["poison_score"], run.evidence.z, run.search.scored[0].box
    run = poisonscan.DetectRun.load("runs/detect/scan1")        # the same object from the folder

The stage records are the typed records of detect/records.py; ``eval``, ``clean`` and ``report`` read runs through
this class.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonscan.config import DetectConfig
from poisonscan.detect.records import ClassifierResult, Evidence, Matching, Record, SearchResult, Verification
from poisonscan.detect.resume import STAGES, read_run_config
from poisonscan.detect.scores import SCORE_COLUMNS, ScoreTable, read_scores
from poisonscan.errors import DataError, UsageError
from poisonscan.settings import resolve_config

#: the stage records of a run folder, by name: file, record type (``None``: a plain JSON object) and the arrays
#: kept beside it
RECORDS: dict[str, tuple[str, type[Record] | None, dict[str, str]]] = {
    "search": ("search.json", SearchResult, {}),
    "evidence": ("evidence.json", Evidence, {}),
    "match": ("match.json", Matching, {"match": "picture_match.npy"}),
    "classifier": ("classifier.json", ClassifierResult, {"probs": "classifier_probs.npy"}),
    "verify": ("verify.json", Verification, {}),
    "summary": ("summary.json", None, {}),
}


@dataclass
class DetectRun:
    """A detect run folder: its settings, which stages finished, their records, the scores and the removal."""

    path: Path
    config: DetectConfig
    done: list[str]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> DetectRun:
        """Read the run folder ``path`` (written by this poisonscan version; ``UsageError`` otherwise)."""
        path = Path(path)
        if not path.is_dir():
            raise UsageError(f"detect run {path} not found")
        saved = read_run_config(path)
        config = resolve_config(DetectConfig, tables=[(str(path / "config.json"), saved)])
        done = [s for s in STAGES if (path / "stages" / f"{s}.done").is_file()]
        return cls(path, config, done)

    @property
    def finished(self) -> bool:
        return "outputs" in self.done

    def record(self, name: str) -> Any:
        """The record ``name`` (one of :data:`RECORDS`) of a finished stage, typed (``summary``: the JSON object);
        ``None`` before it ran."""
        if name not in RECORDS:
            raise KeyError(f"no record {name!r}: one of {', '.join(RECORDS)}")
        if name not in self._cache:
            file_name, kind, arrays = RECORDS[name]
            file = self.path / file_name
            stage = "outputs" if name == "summary" else name
            if stage not in self.done or not file.is_file():
                return None
            try:
                doc = json.loads(file.read_text(encoding="utf-8"))
                loaded = {k: np.load(self.path / f, allow_pickle=False) if (self.path / f).is_file() else None
                          for k, f in arrays.items()}
                self._cache[name] = doc if kind is None else kind.from_json(doc, **loaded)
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(f"cannot read {file}: {exc}") from None
        return self._cache[name]

    def _record_property(name: str) -> property:  # type: ignore[misc]
        return property(lambda self: self.record(name),
                        doc=f"``{RECORDS[name][0]}`` (``None`` before it is written)")

    summary = _record_property("summary")
    search = _record_property("search")             # SearchResult
    evidence = _record_property("evidence")         # Evidence
    match = _record_property("match")               # Matching (with ``match``)
    classifier = _record_property("classifier")     # ClassifierResult (with ``probs``)
    verify = _record_property("verify")             # Verification
    del _record_property

    @property
    def verdict(self) -> str | None:
        """``backdoor signal found``, ``no backdoor signal`` or ``no backdoor signal (removal forced)``."""
        return (self.summary or {}).get("verdict")

    @property
    def reason(self) -> str | None:
        """The one line that says why the run decided as it did."""
        return ((self.summary or {}).get("evidence") or {}).get("reason")

    @property
    def config_record(self) -> dict[str, Any]:
        """The run's ``config.json`` as written (its settings and the version)."""
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    @property
    def scores(self) -> ScoreTable:
        """``scores.csv`` as arrays (a finished run)."""
        return self.read_scores()

    def read_scores(self, required: tuple[str, ...] = SCORE_COLUMNS) -> ScoreTable:
        """``scores.csv`` as arrays (a finished run); ``DataError`` when it lacks one of the ``required`` columns
        (the rest read as empty)."""
        if "scores" not in self._cache:
            self._need_finished("scores.csv")
            self._cache["scores"] = read_scores(self.path / "scores.csv", ())
        table = self._cache["scores"]
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise DataError(f"scores table {self.path / 'scores.csv'} lacks column(s) {', '.join(missing)}")
        return table

    @property
    def removed(self) -> list[str]:
        """The ids of ``removed.txt`` (a finished run), in its order."""
        self._need_finished("removed.txt")
        text = (self.path / "removed.txt").read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line]

    @property
    def unreadable(self) -> list[str]:
        """The ids of the samples the run could not read (``errors.csv``; none when it has no such file)."""
        file = self.path / "errors.csv"
        if not file.is_file():
            return []
        try:
            with file.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or "id" not in reader.fieldnames:
                    raise DataError(f"{file}: not an error list (no 'id' column)")
                return [row["id"] for row in reader]
        except (OSError, csv.Error) as exc:
            raise DataError(f"cannot read {file}: {exc}") from None

    def _need_finished(self, what: str) -> None:
        if not self.finished or not (self.path / what).is_file():
            raise UsageError(f"detect run {self.path} has no {what} yet (stages done: {', '.join(self.done) or 'none'}"
                             "; resume it with --resume)")
