"""A detect run from Python: :func:`scan` runs one, :class:`DetectRun` reads a finished or partial one.

    from poisonscan.detect.run import DetectRun, scan
    run = scan("data/train", "encoder.safetensors", out="runs/detect/scan1", masks=64, min_effect=0.1)
    run.verdict, run.removed[:5], run.scores["poison_score"], run.evidence["z"]
    run = DetectRun.load("runs/detect/scan1")        # the same object from the folder

Settings are named as in :func:`poisonscan.settings.configure` (a section's setting by its own name or dotted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poisonscan.config import DetectConfig, detect_config
from poisonscan.detect.context import STAGES
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.resume import read_run_config
from poisonscan.detect.scores import ScoreTable, read_scores
from poisonscan.errors import DataError, UsageError
from poisonscan.settings import dotted_names, resolve_config

#: the stage records of a run folder, by name
RECORDS = {"search": "search.json", "evidence": "evidence.json", "classifier": "classifier.json",
           "verify": "verify.json", "summary": "summary.json"}


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

    def record(self, name: str) -> dict[str, Any] | None:
        """The JSON record ``name`` (one of :data:`RECORDS`) of a finished stage; ``None`` before it ran."""
        if name not in RECORDS:
            raise KeyError(f"no record {name!r}: one of {', '.join(RECORDS)}")
        if name not in self._cache:
            file = self.path / RECORDS[name]
            stage = "outputs" if name == "summary" else name
            if stage not in self.done or not file.is_file():
                return None
            try:
                self._cache[name] = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read {file}: {exc}") from None
        return self._cache[name]

    def _record_property(name: str) -> property:  # type: ignore[misc]
        return property(lambda self: self.record(name), doc=f"``{RECORDS[name]}`` (``None`` before it is written)")

    summary = _record_property("summary")
    search = _record_property("search")
    evidence = _record_property("evidence")
    classifier = _record_property("classifier")
    verify = _record_property("verify")
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
    def scores(self) -> ScoreTable:
        """``scores.csv`` as arrays (a finished run)."""
        if "scores" not in self._cache:
            self._need_finished("scores.csv")
            self._cache["scores"] = read_scores(self.path / "scores.csv")
        return self._cache["scores"]

    @property
    def removed(self) -> list[str]:
        """The ids of ``removed.txt`` (a finished run), in its order."""
        self._need_finished("removed.txt")
        text = (self.path / "removed.txt").read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line]

    def _need_finished(self, what: str) -> None:
        if not self.finished:
            raise UsageError(f"detect run {self.path} has no {what} yet (stages done: {', '.join(self.done) or 'none'}"
                             "; resume it with --resume)")


def scan(data: str | Path | None, model: str | Path | None, out: str | Path | None = None,
         preset: str | None = None, config: str | Path | None = None, **settings: Any) -> DetectRun | None:
    """Run detect on ``data`` with the threat model ``model`` and return the run (``None`` on ranks > 0 under
    torchrun): the ``preset``'s settings (the defaults when none), then the ``config`` file, then ``settings``
    (``masks=64``, ``min_effect=0.1``, ``device="cpu"``; see :func:`poisonscan.settings.configure`). With
    ``resume=RUN`` the run's own settings replace the preset and the file, and ``settings`` change them."""
    given = {"data": data, "model": model, "out": out, **settings}
    flags = dotted_names(DetectConfig, {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()})
    quiet = bool(settings.pop("quiet", True))
    if settings.get("resume") is not None:
        if preset is not None or config is not None:
            raise UsageError("resume continues with the run's own settings: give changes as settings, not a preset "
                             "or a config file")
        saved = read_run_config(Path(settings["resume"]))
        cfg = resolve_config(DetectConfig, None, flags, tables=[("config.json", saved)])
    else:
        cfg = detect_config(preset, config, flags)
    summary = run_detect(cfg, quiet=quiet)
    return DetectRun.load(summary["run_dir"]) if summary else None
