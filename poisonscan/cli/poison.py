"""``poisonscan poison``: write a backdoor-poisoned copy of a labelled data set, with ground truth."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import typer

from poisonscan.attacks.poison import poison_dataset
from poisonscan.attacks.presets import PRESETS, preset_values
from poisonscan.cli.common import emit_json, err_console, handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import PoisonConfig
from poisonscan.settings import resolve_config


def build_config(flags: dict[str, Any], config_file: Path | None) -> PoisonConfig:
    """defaults < preset < config file < flags; the preset fills only what the file and the flags leave unset."""
    cfg = resolve_config(PoisonConfig, config_file, flags)
    if not cfg.preset:
        return cfg
    from_file = resolve_config(PoisonConfig, config_file, None) if config_file else PoisonConfig()
    defaults = PoisonConfig()
    explicit = set(flags) | {f.name for f in fields(PoisonConfig)
                             if getattr(from_file, f.name) != getattr(defaults, f.name)}
    values = preset_values(cfg.preset, cfg.shared_data)
    if "dataset_rate" in explicit:
        values.pop("rate", None)
    return replace(cfg, **{k: v for k, v in values.items() if k not in explicit})


def default_out(cfg: PoisonConfig) -> str:
    """``runs/poison/<preset or data set name>``."""
    name = cfg.preset or Path(cfg.data.rstrip("/\\")).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"
    return str(Path("runs") / "poison" / name[:60])


def _print(summary: dict[str, Any]) -> None:
    out = Path(summary["out"])
    train = summary["train"]
    pct = 100.0 * train["poisoned"] / max(1, train["n"])
    typer.echo(f"poisoned {train['poisoned']} of {train['n']} images ({pct:.2f}%, attack {summary['attack']}) -> "
               f"{out / train['spec']} ({train['kind']})")
    for t in summary["targets"]:
        trig = t["trigger"] or summary["attack"]
        typer.echo(f"  target {t['label']} {t['name']}: {trig}, {t['poisoned']} of {t['class_size']} images")
    typer.echo(f"  ground truth: {out / train['ground_truth']}")
    val = summary.get("val_patched")
    if val:
        typer.echo(f"patched val: {val['n']} images -> {out / val['spec']} (ground truth {out / val['ground_truth']})")
    if summary.get("licence"):
        typer.echo(f"trigger licence: {out / summary['licence']}")
    for what, entry in (("train", train["dropped_unreadable"]),
                        ("val", (val or {}).get("dropped_unreadable", {"n": 0}))):
        if entry["n"]:
            ex = entry["examples"][0]
            err_console.print(f"[yellow]warning:[/] {entry['n']} unreadable {what} sample(s) left out "
                              f"(first: {ex['id']}: {ex['reason']})", markup=True, highlight=False)


@handle_errors
def poison(
    data: str | None = typer.Argument(None, help="Labelled data set: image folder (ImageFolder), 'path label' "
                                                 "file list, or WebDataset shards (folder, pattern, .tar/.tar.gz) "
                                                 f"{required('--preset')}."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help=f"Output folder {described('runs/poison/<preset or data folder name>')}."),
    target: list[str] | None = typer.Option(None, "--target", "-t",
                                            help="CLASS=TRIGGER.png (class name or index); repeat for a "
                                                 "multi-target attack; ctrl takes CLASS alone "
                                                 f"{required('--preset')}."),
    attack: str | None = typer.Option(None, "--attack", help="patch (HTBA), blend or ctrl "
                                                             f"{default(PoisonConfig, 'attack')}."),
    rate: float | None = typer.Option(None, "--rate", help="Fraction of each target class poisoned "
                                                       f"{described('0.5')}."),
    dataset_rate: float | None = typer.Option(None, "--dataset-rate",
                                              help="Fraction of the whole data set poisoned (instead of --rate)."),
    trigger_size: float | None = typer.Option(None, "--trigger-size",
                                              help="Trigger side: pixels (>= 1) or fraction of the short side "
                                                   f"(< 1) {default(PoisonConfig, 'trigger_size')}."),
    margin: float | None = typer.Option(None, "--margin", help="Top-left corner in m W .. (1 - m) W - size "
                                                               f"{default(PoisonConfig, 'margin')}."),
    val_margin: float | None = typer.Option(None, "--val-margin", help="Margin on the patched val set "
                                                                       f"{default(PoisonConfig, 'val_margin')}."),
    opacity: float | None = typer.Option(None, "--opacity", help="Patch opacity, 1 = HTBA paste "
                                                                 f"{default(PoisonConfig, 'opacity')}."),
    scale_jitter: float | None = typer.Option(None, "--scale-jitter",
                                              help="Each copy's side times 1 +- S (patch) "
                                                   f"{default(PoisonConfig, 'scale_jitter')}."),
    rotation: float | None = typer.Option(None, "--rotation", help="Each copy turned up to +- DEG degrees (patch) "
                                                                   f"{default(PoisonConfig, 'rotation')}."),
    colour_jitter: float | None = typer.Option(None, "--colour-jitter",
                                               help="Each copy's RGB gains 1 +- C (patch) "
                                                    f"{default(PoisonConfig, 'colour_jitter')}."),
    blend_alpha: float | None = typer.Option(None, "--blend-alpha", help="Blend attack alpha "
                                                                         f"{default(PoisonConfig, 'blend_alpha')}."),
    ctrl_magnitude: float | None = typer.Option(None, "--ctrl-magnitude",
                                                help="CTRL magnitude, training "
                                                     f"{default(PoisonConfig, 'ctrl_magnitude')}."),
    ctrl_val_magnitude: float | None = typer.Option(None, "--ctrl-val-magnitude",
                                                    help="CTRL magnitude on the patched val set "
                                                         f"{default(PoisonConfig, 'ctrl_val_magnitude')}."),
    ctrl_block: int | None = typer.Option(None, "--ctrl-block", help="CTRL DCT block side; 0 = scaled with the "
                                                                      f"image {default(PoisonConfig, 'ctrl_block')}."),
    val: str | None = typer.Option(None, "--val", help="Validation set to patch (every image, margin --val-margin)."),
    seed: int | None = typer.Option(None, "--seed", help=f"Random seed {default(PoisonConfig, 'seed')}."),
    link: bool | None = typer.Option(None, "--link/--copy", help="Hard-link clean images instead of copying them "
                                                                 "(folders and file lists) "
                                                                 f"{default(PoisonConfig, 'link')}."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing poison output."),
    preset: str | None = typer.Option(None, "--preset", help=f"Named setting: {', '.join(PRESETS)}."),
    shared_data: str | None = typer.Option(None, "--shared-data",
                                           help="Presets' data root "
                                                + described("$POISONSCAN_DATA, else ../shared/data") + "."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings."),
    device: str | None = typer.Option(None, "--device", help="Accepted like every command's; poisoning runs on "
                                                             "the CPU."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Write a poisoned copy of a labelled data set, its ground truth and a patched validation set."""
    flags = overrides(data=data, out=str(out) if out else None, targets=target or None, attack=attack, rate=rate,
                      dataset_rate=dataset_rate, trigger_size=trigger_size, margin=margin, val_margin=val_margin,
                      opacity=opacity, scale_jitter=scale_jitter, rotation=rotation, colour_jitter=colour_jitter,
                      blend_alpha=blend_alpha, ctrl_magnitude=ctrl_magnitude,
                      ctrl_val_magnitude=ctrl_val_magnitude, ctrl_block=ctrl_block, val=val, seed=seed, link=link,
                      overwrite=overwrite or None, preset=preset, shared_data=shared_data)
    cfg = build_config(flags, config)
    if not cfg.out and cfg.data:
        cfg = replace(cfg, out=default_out(cfg))
    summary = poison_dataset(cfg, quiet=quiet)
    if "skipped" in summary:
        return
    if json_out:
        emit_json(summary)
    else:
        _print(summary)


def register(app: typer.Typer) -> None:
    """Add ``poison`` to the ``poisonscan`` app."""
    app.command("poison")(poison)
