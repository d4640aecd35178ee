"""Cleaning: the data set minus a detect run's removal list, as a manifest in the input's own format (and shards).

A detect run is read through :class:`~poisonscan.detect.run.DetectRun` (its data source, removal list, the samples
it scanned and those it could not read); the manifest and shards are written by data/writers.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from poisonscan.config import CleanConfig
from poisonscan.data.sources import Source, open_source
from poisonscan.data.writers import overlaps, read_removal_list, removal_indices, reshard, write_manifest
from poisonscan.detect.run import DetectRun
from poisonscan.errors import UsageError


def _open_run(run: Path) -> DetectRun:
    if not run.is_dir():
        raise UsageError(f"run folder {run} does not exist")
    return DetectRun.load(run)


def unscanned_indices(source: Source, run: DetectRun) -> tuple[list[int], list[int]]:
    """Samples of ``source`` a detect run did not scan: ``(unreadable, never scanned)`` index lists.

    A sample counts as scanned when the finished run's ``scores.csv`` has its id and ``errors.csv`` does not (a
    WebDataset key repeated in a shard is scanned once and listed as an error: which copy a loader reads is not
    known); of the rest, those listed in ``errors.csv`` were unreadable, the others were not in the data the run read
    (the source changed since).
    """
    if not run.finished:
        raise UsageError(f"{run.path}: the run did not finish (resume it with detect --resume), so which samples it "
                         "scanned is not known")
    scanned = set(run.read_scores(("id",)).ids)
    errors = set(run.unreadable)
    unreadable, unseen = [], []
    for i, sid in enumerate(source.ids):
        if sid in errors:
            unreadable.append(i)
        elif sid not in scanned:
            unseen.append(i)
    return unreadable, unseen


def clean_dataset(cfg: CleanConfig) -> dict[str, Any]:
    """Resolve inputs, write the manifest (and shards); returns the summary. Raises ``UsageError``."""
    if not cfg.out:
        raise UsageError("--out is required (the cleaned manifest: .txt for folders/file lists, .tsv for shards)")
    run = _open_run(Path(cfg.run)) if cfg.run else None
    spec = cfg.source if cfg.source is not None else (run.config.data if run is not None else None)
    if not spec:
        raise UsageError("no data source: give --source, or --run with a detect run whose config.json has 'data'")
    removed_path = Path(cfg.removed) if cfg.removed else (run.path / "removed.txt" if run is not None else None)
    if removed_path is None:
        raise UsageError("no removal list: give --removed, or --run with a detect run folder")
    if not removed_path.is_file():
        raise UsageError(f"removal list {removed_path} not found")

    source = open_source(spec)
    removed_ids = read_removal_list(removed_path)
    keep, removed, unknown = removal_indices(source, removed_ids)
    unreadable: list[int] = []
    unseen: list[int] = []
    if run is not None:
        unreadable, unseen = unscanned_indices(source, run)
        if not cfg.keep_unreadable:
            dropped = set(unreadable) | set(unseen)
            keep = [i for i in keep if i not in dropped]

    out = Path(cfg.out)
    _refuse_input(out, source, removed_path)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")

    summary: dict[str, Any] = {
        "source": {"kind": source.kind, "spec": source.spec(), "n": len(source), "errors": len(source.errors)},
        "removal_list": str(removed_path), "listed": len(removed_ids), "removed": len(removed), "kept": len(keep),
        "unknown": len(unknown), "unknown_examples": unknown[:5], "manifest": str(out),
        "manifest_format": "wds-manifest" if source.is_sharded else "filelist",
        "strict": cfg.strict,
        "unscanned": {"checked": run is not None, "unreadable": len(unreadable), "not_scanned": len(unseen),
                      "kept": cfg.keep_unreadable, "examples": [source.ids[i] for i in (unreadable + unseen)[:5]]},
    }
    if unknown and cfg.strict:
        summary["ok"] = False
        return summary
    write_manifest(source, keep, out)
    if cfg.reshard:
        res = reshard(source, keep, Path(cfg.reshard), shard_size=cfg.shard_size, compress=cfg.compress)
        summary["reshard"] = {"dir": cfg.reshard, "shards": [str(p) for p in res.shards],
                              "written": res.n_written,
                              "errors": [{"id": e.id, "reason": e.reason} for e in res.errors]}
    summary["ok"] = True
    return summary


def _refuse_input(out: Path, source: Source, removed_path: Path) -> None:
    """``UsageError`` when the manifest ``out`` would replace an input (a shard, list, image or the removal list) or
    land inside an image folder being cleaned: the input is never modified."""
    real = os.path.realpath(out)
    files = source.read_files() if os.path.lexists(out) else []     # a path not there is no listed image
    protected = {os.path.realpath(p) for p in [*source.input_paths(), removed_path, *files]}
    if real in protected:
        raise UsageError(f"--out {out} is an input file; the input is never modified")
    if source.kind == "folder" and overlaps(real, source.root):
        raise UsageError(f"--out {out} is inside the input folder {source.root}; the input is never modified")
