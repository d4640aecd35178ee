"""``poisonscan clean``: write the data set minus the removed samples, in the input's own format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from poisonscan.cli.common import emit_json, err_console, handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import CleanConfig
from poisonscan.settings import resolve_config
from poisonscan.cleaning import clean_dataset
from poisonscan.errors import EXIT_USAGE


def _print(summary: dict[str, Any], quiet: bool = False) -> None:
    """The summary lines on stdout (none with ``quiet``) and the warnings on stderr."""
    src = summary["source"]
    if summary["unknown"]:
        ex = ", ".join(repr(x) for x in summary["unknown_examples"])
        err_console.print(f"[yellow]warning:[/] {summary['unknown']} id(s) in {summary['removal_list']} are not in "
                          f"the source (e.g. {ex})", markup=True, highlight=False)
    if not summary["ok"]:
        typer.echo("error: --strict: unknown ids in the removal list; nothing written", err=True)
        return
    _warn_unscanned(summary)
    if not quiet:
        typer.echo(f"source: {src['kind']} with {src['n']} samples")
        typer.echo(f"removed {summary['removed']}, kept {summary['kept']}, unknown ids in removal list "
                   f"{summary['unknown']}")
        typer.echo(f"manifest ({summary['manifest_format']}): {summary['manifest']}")
    if "reshard" in summary:
        rs = summary["reshard"]
        if not quiet:
            typer.echo(f"reshard: {rs['written']} samples in {len(rs['shards'])} shard(s) under {rs['dir']}")
        if rs["errors"]:
            err_console.print(f"[yellow]warning:[/] {len(rs['errors'])} sample(s) could not be read and were not "
                              f"written (first: {rs['errors'][0]['id']}: {rs['errors'][0]['reason']})",
                              markup=True, highlight=False)


def _warn_unscanned(summary: dict[str, Any]) -> None:
    """One line on stderr about the samples the detect run did not scan (or could not check)."""
    uns = summary["unscanned"]
    if not uns["checked"]:
        err_console.print("[yellow]warning:[/] no --run: which samples were scanned is not known; every sample not "
                          "in the removal list is kept", markup=True, highlight=False, soft_wrap=True)
        return
    n = uns["unreadable"] + uns["not_scanned"]
    if n:
        what = "kept (--keep-unreadable)" if uns["kept"] else "left out of the cleaned manifest"
        ex = ", ".join(repr(x) for x in uns["examples"][:3])
        err_console.print(f"[yellow]warning:[/] {n} sample(s) were not scanned ({uns['unreadable']} unreadable, "
                          f"{uns['not_scanned']} not in the run) and are {what} (e.g. {ex})", markup=True,
                          highlight=False, soft_wrap=True)


@handle_errors
def clean(
    run: Path | None = typer.Option(None, "--run", help="Detect run folder (reads removed.txt and config.json)."),
    source: str | None = typer.Option(None, "--source", help="Data source spec "
                                                            + described("the run's data") + "."),
    removed: Path | None = typer.Option(None, "--removed", help="Removal list, one id per line "
                                                                f"{described('RUN/removed.txt')}."),
    out: Path | None = typer.Option(None, "--out", help="Cleaned manifest: .txt file list or .tsv for shards "
                                                     f"{required()}."),
    reshard_dir: Path | None = typer.Option(None, "--reshard", help="Also write new WebDataset shards here "
                                                                    "(empty or new folder)."),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Samples per new shard "
                                                                              f"{default(CleanConfig, 'shard_size')}."),
    compress: bool | None = typer.Option(None, "--compress/--no-compress", help="Gzip the new shards "
                                                                                f"{default(CleanConfig, 'compress')}."),
    strict: bool | None = typer.Option(None, "--strict/--no-strict", help="Exit 2 (writing nothing) when the "
                                                                          "removal list names unknown ids "
                                                                          f"{default(CleanConfig, 'strict')}."),
    keep_unreadable: bool | None = typer.Option(
        None, "--keep-unreadable/--drop-unreadable",
        help="Keep the samples the run could not read or did not scan (errors.csv) in the cleaned manifest; they "
             f"were never checked for a trigger {default(CleanConfig, 'keep_unreadable')}."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings."),
    device: str | None = typer.Option(None, "--device", help="Accepted like every command's; clean runs no model "
                                                            f"{default(CleanConfig, 'device')}."),
    seed: int | None = typer.Option(None, "--seed", help="Accepted like every command's; clean draws nothing at "
                                                         f"random {default(CleanConfig, 'seed')}."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary lines (warnings and errors still go to "
                                                            "stderr)."),
) -> None:
    """Write the data set minus the removed samples (a manifest in the input's own format; optionally new shards)."""
    cfg = resolve_config(CleanConfig, config, overrides(
        run=str(run) if run else None, source=source, removed=str(removed) if removed else None,
        out=str(out) if out else None, reshard=str(reshard_dir) if reshard_dir else None, shard_size=shard_size,
        compress=compress, strict=strict, keep_unreadable=keep_unreadable, device=device, seed=seed,
        quiet=quiet or None))
    summary = clean_dataset(cfg)
    if json_out:
        emit_json(summary)
        if summary["ok"]:
            _warn_unscanned(summary)
        if summary["unknown"]:
            typer.echo(f"warning: {summary['unknown']} id(s) in the removal list are not in the source", err=True)
    else:
        _print(summary, cfg.quiet)
    if not summary["ok"]:
        raise typer.Exit(EXIT_USAGE)


def register(app: typer.Typer) -> None:
    """Add ``clean`` to the ``poisonscan`` app."""
    app.command("clean")(clean)
