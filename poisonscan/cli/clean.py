"""``poisonscan clean``: write the data set minus the removed samples, in the input's own format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from poisonscan.cli.common import emit_json, err_console, handle_errors, overrides
from poisonscan.config import CleanConfig, resolve_config
from poisonscan.data.manifest import read_removal_list, removal_indices, reshard, write_manifest
from poisonscan.data.sources import Source, open_source
from poisonscan.errors import EXIT_USAGE, UsageError


def _run_config(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise UsageError(f"run folder {run} does not exist")
    cfg = run / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{cfg} not found (is {run} a detect run?); give --source")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {cfg}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _input_files(source: Source) -> set[str]:
    spec = source.spec()
    files = [spec] if isinstance(spec, str) else list(spec)
    base = getattr(source, "base", None)  # a WebDataset manifest also reads its shards
    if base is not None:
        files += base.spec()
    return {os.path.realpath(f) for f in files}


def clean_dataset(cfg: CleanConfig) -> dict[str, Any]:
    """Resolve inputs, write the manifest (and shards); returns the summary. Raises ``UsageError``."""
    if not cfg.out:
        raise UsageError("--out is required (the cleaned manifest: .txt for folders/file lists, .tsv for shards)")
    run = Path(cfg.run) if cfg.run else None
    run_cfg = _run_config(run) if run is not None and (cfg.source is None or cfg.removed is None) else {}
    spec = cfg.source if cfg.source is not None else run_cfg.get("data")
    if not spec:
        raise UsageError("no data source: give --source, or --run with a detect run whose config.json has 'data'")
    removed_path = Path(cfg.removed) if cfg.removed else (run / "removed.txt" if run is not None else None)
    if removed_path is None:
        raise UsageError("no removal list: give --removed, or --run with a detect run folder")
    if not removed_path.is_file():
        raise UsageError(f"removal list {removed_path} not found")

    source = open_source(spec)
    removed_ids = read_removal_list(removed_path)
    keep, removed, unknown = removal_indices(source, removed_ids)

    out = Path(cfg.out)
    protected = _input_files(source) | {os.path.realpath(removed_path)}
    if os.path.realpath(out) in protected:
        raise UsageError(f"--out {out} is an input file; the input is never modified")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")

    summary: dict[str, Any] = {
        "source": {"kind": source.kind, "spec": source.spec(), "n": len(source), "errors": len(source.errors)},
        "removal_list": str(removed_path), "listed": len(removed_ids), "removed": len(removed), "kept": len(keep),
        "unknown": len(unknown), "unknown_examples": unknown[:5], "manifest": str(out),
        "manifest_format": "wds-manifest" if source.kind in ("wds", "wds-manifest") else "filelist",
        "strict": cfg.strict,
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


def _print(summary: dict[str, Any]) -> None:
    src = summary["source"]
    if summary["unknown"]:
        ex = ", ".join(repr(x) for x in summary["unknown_examples"])
        err_console.print(f"[yellow]warning:[/] {summary['unknown']} id(s) in {summary['removal_list']} are not in "
                          f"the source (e.g. {ex})", markup=True, highlight=False)
    if not summary["ok"]:
        typer.echo("error: --strict: unknown ids in the removal list; nothing written", err=True)
        return
    typer.echo(f"source: {src['kind']} with {src['n']} samples")
    typer.echo(f"removed {summary['removed']}, kept {summary['kept']}, unknown ids in removal list "
               f"{summary['unknown']}")
    typer.echo(f"manifest ({summary['manifest_format']}): {summary['manifest']}")
    if "reshard" in summary:
        rs = summary["reshard"]
        typer.echo(f"reshard: {rs['written']} samples in {len(rs['shards'])} shard(s) under {rs['dir']}")
        if rs["errors"]:
            err_console.print(f"[yellow]warning:[/] {len(rs['errors'])} sample(s) could not be read and were not "
                              f"written (first: {rs['errors'][0]['id']}: {rs['errors'][0]['reason']})",
                              markup=True, highlight=False)


@handle_errors
def clean(
    run: Path | None = typer.Option(None, "--run", help="Detect run folder (reads removed.txt and config.json)."),
    source: str | None = typer.Option(None, "--source", help="Data source spec (default: the run's 'data')."),
    removed: Path | None = typer.Option(None, "--removed", help="Removal list, one id per line "
                                                                "(default: RUN/removed.txt)."),
    out: Path | None = typer.Option(None, "--out", help="Cleaned manifest: .txt file list or .tsv for shards."),
    reshard_dir: Path | None = typer.Option(None, "--reshard", help="Also write new WebDataset shards here "
                                                                    "(empty or new folder)."),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Samples per new shard [5000]."),
    compress: bool | None = typer.Option(None, "--compress/--no-compress", help="Gzip the new shards."),
    strict: bool | None = typer.Option(None, "--strict/--no-strict", help="Exit 2 (writing nothing) when the "
                                                                          "removal list names unknown ids."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Write the data set minus the removed samples (a manifest in the input's own format; optionally new shards)."""
    cfg = resolve_config(CleanConfig, config, overrides(
        run=str(run) if run else None, source=source, removed=str(removed) if removed else None,
        out=str(out) if out else None, reshard=str(reshard_dir) if reshard_dir else None, shard_size=shard_size,
        compress=compress, strict=strict))
    summary = clean_dataset(cfg)
    if json_out:
        emit_json(summary)
        if summary["unknown"]:
            typer.echo(f"warning: {summary['unknown']} id(s) in the removal list are not in the source", err=True)
    else:
        _print(summary)
    if not summary["ok"]:
        raise typer.Exit(EXIT_USAGE)


def register(app: typer.Typer) -> None:
    """Add ``clean`` to the ``poisonscan`` app."""
    app.command("clean")(clean)
