"""``poisonscan detect``: find the poisoned images of a data set with a (possibly backdoored) SSL threat model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from poisonscan.cli.common import emit_json, handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import DETECT_FLAGS, EXACT, DetectConfig, detect_config, presets
from poisonscan.errors import ConfigError
from poisonscan.settings import parse_assignment, resolve_config


def parse_window(text: str | None) -> float | None:
    """``60/224`` (a fraction of the image side), ``0.27`` (a fraction) or ``17`` (pixels)."""
    if text is None:
        return None
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--window {text}: give pixels (17) or a fraction of the image side (60/224, 0.27)") \
            from None
    if not value > 0:
        raise ConfigError(f"--window {text} must be > 0")
    if "/" in text and value >= 1:
        raise ConfigError(f"--window {text}: a fraction of the image side must be below 1 (60/224); give pixels as "
                          "a whole number (17)")
    return value


def _flag(value: bool) -> bool | None:
    """A switch given on the command line overrides the config; one left out does not."""
    return True if value else None


@handle_errors
def detect(
    data: str | None = typer.Argument(None, help="Data set: image folder, .txt file list or WebDataset shards "
                                                 "(optional with --resume)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Threat model checkpoint (safetensors or "
                                                                 f"foreign state dict) {required('--resume')}."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of a foreign checkpoint (timm name)."),
    image_size: int | None = typer.Option(None, "--image-size", min=8,
                                          help="Input resolution S " + described("the checkpoint's") + "."),
    out: Path | None = typer.Option(None, "--out", "-o", help=f"Run folder {described('runs/detect/runN')}."),
    preset: str | None = typer.Option(None, "--preset",
                                      help=f"Settings to start from: {', '.join(presets())} (paper: the paper's "
                                           "recipe exactly; patchsearch: the baseline) "
                                           f"{default(DetectConfig, 'preset')}."),
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON settings over the preset (a "
                                                              "\\[detect] table, sections as \\[detect.search] ...)."),
    settings: list[str] | None = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                                              help="Any setting of a stage (search, evidence, classifier, "
                                                   "decision), e.g. --set decision.min_effect=0.1; repeatable. "
                                                   "The settings and their defaults: docs/commands/detect.md."),
    method: str | None = typer.Option(None, "--method", help="poisoncam (cluster activation masking) or "
                                                             "patchsearch (Grad-CAM baseline) "
                                                             f"{default(DetectConfig, 'search.method')}."),
    clusters: int | None = typer.Option(None, "--clusters", min=1, help=f"k-means clusters l, capped at N / 50 "
                                                                        f"{default(DetectConfig, 'clusters')}."),
    masks: int | None = typer.Option(None, "--masks", min=1,
                                     help=f"Masks per image B {default(DetectConfig, 'search.masks')}."),
    window: str | None = typer.Option(None, "--window", help="Window side: pixels (17) or a fraction of the "
                                                             "image side (60/224) "
                                                             f"{default(DetectConfig, 'search.window')}."),
    flip_size: int | None = typer.Option(None, "--flip-size", min=1,
                                         help=f"Flip test set size {default(DetectConfig, 'search.flip_size')}."),
    feature_dtype: str | None = typer.Option(None, "--feature-dtype",
                                             help="Feature storage: float32 or float16 (half the memory) "
                                                  f"{default(DetectConfig, 'feature_dtype')}."),
    force: bool = typer.Option(False, "--force", help="Remove even without evidence: the images that hold a "
                                                      "recurring picture, else the classifier's picks."),
    exact: bool = typer.Option(False, "--exact", help="The paper's cost: all B masks on every image, zeroing "
                                                      "pixels (ViTs too), every window and null window on the whole "
                                                      "flip set (no coarse-to-fine masking, no adaptive testing), "
                                                      "the classifier trained even where the picture match "
                                                      "removes."),
    fail_on: float | None = typer.Option(None, "--fail-on", min=0.0, help="Exit 1 when more images are removed: "
                                                                          "a count (>= 1) or a fraction (< 1)."),
    fail_on_unreadable: int | None = typer.Option(
        None, "--fail-on-unreadable", min=0,
        help="Exit 1 when more samples than this could not be read (and so were not scanned) "
             f"{described('0 with --fail-on', 'not checked without it')}."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run folder from its last finished "
                                                              "stage (changed settings rerun what they shape)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse a non-empty --out folder (starts afresh)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow pickled (.pth) checkpoints: "
                                                                            "only for files you trust."),
    device: str | None = typer.Option(None, "--device",
                                      help=f"auto, cpu, cuda, cuda:N {default(DetectConfig, 'device')}."),
    precision: str | None = typer.Option(None, "--precision",
                                         help=f"auto, bf16, fp16, fp32 {default(DetectConfig, 'precision')}."),
    seed: int | None = typer.Option(None, "--seed",
                                    help=f"Seed of every random choice {default(DetectConfig, 'seed')}."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help=f"Forward batch size {default(DetectConfig, 'batch_size')}."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; one result line instead of tables."),
) -> None:
    """Scan DATA with the threat model: search poisonous images, test the evidence, remove with a classifier."""
    from poisonscan.detect.pipeline import run_detect
    from poisonscan.detect.resume import read_run_config
    from poisonscan.report.summary import print_detect_summary

    flags = overrides(
        data=data, model=model, arch=arch, image_size=image_size, out=str(out) if out else None,
        clusters=clusters, feature_dtype=feature_dtype, fail_on=fail_on, fail_on_unreadable=fail_on_unreadable,
        resume=str(resume) if resume else None, overwrite=_flag(overwrite),
        trust_checkpoint=_flag(trust_checkpoint), device=device, precision=precision, seed=seed,
        batch_size=batch_size, quiet=_flag(quiet))
    given = {"--method": method, "--masks": masks, "--window": parse_window(window), "--flip-size": flip_size,
             "--force": _flag(force)}
    flags.update({key: given[flag] for key, flag in DETECT_FLAGS.items()})
    if exact:
        flags.update(EXACT)
    for text in settings or []:
        key, value = parse_assignment(text)
        if "." not in key:
            raise ConfigError(f"--set {text}: name a stage's setting as SECTION.KEY (search, evidence, classifier, "
                              f"decision); {key} has its own flag or config key")
        flags[key] = value
    if resume is not None:
        if config is not None or preset is not None:
            raise ConfigError("--resume continues with the run's own config.json: give changed settings as flags "
                              "or --set, not --config or --preset")
        saved = read_run_config(resume)
        cfg = resolve_config(DetectConfig, None, flags, tables=[(str(resume / "config.json"), saved)],
                             flag_names=DETECT_FLAGS)
        # how this invocation prints is its own: -q (or its absence) wins over a quiet saved in config.json
        cfg = replace(cfg, quiet=bool(quiet))
    else:
        cfg = detect_config(preset, config, flags)
    summary = run_detect(cfg, quiet=cfg.quiet)
    if not summary:                          # ranks > 0 under torchrun: rank 0 reports
        return
    if json_out:
        emit_json(summary)
    elif cfg.quiet:
        counts = summary["counts"]
        typer.echo(f"{summary['verdict']}: removed {counts['removed']} of {counts['scanned']} "
                   f"({summary['run_dir']})")
    else:
        print_detect_summary(summary, Console())
    if summary.get("exit_code"):
        raise typer.Exit(int(summary["exit_code"]))


def register(app: typer.Typer) -> None:
    """Add ``detect`` to the ``poisonscan`` app."""
    app.command("detect")(detect)
