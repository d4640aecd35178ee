"""A detect run's folder: created, or reopened by ``--resume`` with the stages whose settings changed forgotten.

Each setting's stage is read from the dataclasses' ``stage`` metadata (:class:`poisonscan.config.DetectConfig`):
a resume reruns from the earliest stage a changed setting shapes, and from the store when the data's files changed
since it was decoded. ``config.json`` records the poisonscan version; a run of another version is refused.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from poisonscan import __version__
from poisonscan import runtime as rt
from poisonscan.config import DetectConfig
from poisonscan.data.sources import open_source
from poisonscan.data.store import store_is_current
from poisonscan.errors import UsageError
from poisonscan.runs import INVOCATION_SETTINGS, RunDir, absolute_settings, config_record, create_run, lock_run
from poisonscan.settings import sections


#: the detect stages in order (each leaves ``stages/<stage>.done`` in the run folder)
STAGES = ("store", "features", "clusters", "search", "evidence", "match", "classifier", "verify", "outputs")
SECTIONS = sections(DetectConfig)


def _clear_from(run: RunDir, stage: str) -> None:
    """Forget ``stage`` and every later one (and a partial search when the search is redone); the decision's files
    go too, so nothing reads a removal list the new settings have not made."""
    for s in STAGES[STAGES.index(stage):]:
        run.clear_stage(s)
    for name in ("removed.txt", "scores.csv", "summary.json"):
        run.file(name).unlink(missing_ok=True)
    if STAGES.index(stage) <= STAGES.index("search"):
        run.file("search.json").unlink(missing_ok=True)
        shutil.rmtree(run.file("search"), ignore_errors=True)


def rerun_from(saved: dict[str, Any], cfg: DetectConfig) -> str | None:
    """The first stage whose settings differ between a run's saved ``config.json`` and ``cfg``: each setting's
    stage is its field's ``stage`` metadata (a section's: the section field's), see :class:`DetectConfig`."""
    new = config_record(cfg)
    changed = []
    for f in fields(DetectConfig):
        name = f.metadata.get("stage")
        if name is None or saved.get(f.name) == new.get(f.name):
            continue
        if f.name in SECTIONS:           # a section: each changed setting's own stage, else the section's
            old, now = saved.get(f.name) or {}, new[f.name]
            changed += [g.metadata.get("stage", name) for g in fields(SECTIONS[f.name])
                        if old.get(g.name) != now[g.name]]
        else:
            changed.append(name)
    return min(changed, key=STAGES.index) if changed else None


def read_run_config(path: Path) -> dict[str, Any]:
    """The settings of the detect run folder ``path`` (its ``config.json`` without the version line and the switches
    of its invocation); a run of another poisonscan version, or no run at all, is refused with one line."""
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a detect run folder (no config.json)")
    saved = RunDir(path).read_json("config.json")
    version = saved.pop("version", None) if isinstance(saved, dict) else None
    if version != __version__:
        raise UsageError(f"{path}: a detect run written by poisonscan {version or 'of another version'}, this is "
                         f"{__version__}; run detect again")
    return {k: v for k, v in saved.items() if k not in INVOCATION_SETTINGS}


def _data_changed(run: RunDir, cfg: DetectConfig) -> bool:
    """Whether the data's files changed since the run's store decoded them (said on stderr). Data that cannot be
    opened now is not checked: the store decoded from it is kept, with a warning."""
    try:
        source = open_source(cfg.data)
    except (UsageError, OSError) as exc:
        print(f"poisonscan: warning: cannot check {cfg.data} against {run.path}'s image store ({exc}); keeping the "
              "store", file=sys.stderr, flush=True)
        return False
    if store_is_current(run.file("store"), source):
        return False
    if not cfg.quiet:
        print(f"poisonscan: the data's files changed since {run.path} decoded them: decoding them again",
              file=sys.stderr, flush=True)
    return True


def open_run(cfg: DetectConfig, runtime: rt.Runtime) -> RunDir:
    """Create the run folder, or reopen it for ``--resume`` and forget the stages whose settings changed.

    Rank 0 locks the folder (:func:`poisonscan.runs.lock_run`, released when :func:`run_detect` ends) and writes
    ``config.json`` (absolute paths) and ``environment.json``.
    """
    if cfg.resume:
        path = Path(cfg.resume)
        saved = absolute_settings(read_run_config(path))
        run = RunDir(path, lock_run(path) if runtime.is_main else None)
        if runtime.is_main:
            rerun = rerun_from(saved, cfg)
            if rerun != STAGES[0] and run.stage_done("store") and _data_changed(run, cfg):
                rerun = STAGES[0]
            if rerun is not None:
                _clear_from(run, rerun)
    else:
        made = create_run("detect", cfg.out, overwrite=cfg.overwrite) if runtime.is_main else None
        path = rt.broadcast_object(made.path if made is not None else None)
        run = made if made is not None else RunDir(path)
        if runtime.is_main:
            _clear_from(run, STAGES[0])      # --overwrite of an older run: start from scratch
    if runtime.is_main:
        run.write_json("config.json", {"version": __version__, **config_record(cfg)})
        run.write_environment(cfg.seed, runtime)
    rt.barrier()
    return run
