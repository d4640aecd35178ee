"""``poisonscan clean``: write the data set minus the removed samples, in the input's own format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from poisonscan.cli.common import emit_json, err_console, handle_errors, overrides
from poisonscan.config import CleanConfig, resolve_config
from poisonscan.data.cleaning import clean_dataset
from poisonscan.errors import EXIT_USAGE


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
