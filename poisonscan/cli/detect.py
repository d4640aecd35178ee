"""``poisonscan detect``: find the poisoned images of a data set with a (possibly backdoored) SSL threat model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from poisonscan.cli.common import emit_json, handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import DetectConfig, resolve_config
from poisonscan.errors import ConfigError, UsageError


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
    config: Path | None = typer.Option(None, "--config", help="TOML/YAML/JSON settings (a \\[detect] table is "
                                                              "accepted)."),
    method: str | None = typer.Option(None, "--method", help="poisoncam (cluster activation masking) or "
                                                             "patchsearch (Grad-CAM baseline) "
                                                             f"{default(DetectConfig, 'method')}."),
    clusters: int | None = typer.Option(None, "--clusters", min=1, help=f"k-means clusters l, capped at N / 50 "
                                                                        f"{default(DetectConfig, 'clusters')}."),
    masks: int | None = typer.Option(None, "--masks", min=1,
                                     help=f"Masks per image B {default(DetectConfig, 'masks')}."),
    window: str | None = typer.Option(None, "--window", help="Window side: pixels (17) or a fraction of the "
                                                             "image side (60/224) "
                                                             f"{default(DetectConfig, 'window')}."),
    mask_strategy: str | None = typer.Option(None, "--mask-strategy",
                                             help="full, interval or random "
                                                  f"{default(DetectConfig, 'mask_strategy')}."),
    flip_size: int | None = typer.Option(None, "--flip-size", min=1, help=f"Flip test set size "
                                                                          f"{default(DetectConfig, 'flip_size')}."),
    samples_per_cluster: int | None = typer.Option(None, "--samples-per-cluster", min=1,
                                                   help=f"Images scored per live cluster and round s "
                                                        f"{default(DetectConfig, 'samples_per_cluster')}."),
    drop_fraction: float | None = typer.Option(None, "--drop-fraction", min=0.0, max=1.0,
                                               help="Live clusters dropped per round r "
                                                    f"{default(DetectConfig, 'drop_fraction')}."),
    top_k: int | None = typer.Option(None, "--top-k", min=1,
                                     help=f"Poison set size k {default(DetectConfig, 'top_k')}."),
    drop_top: float | None = typer.Option(None, "--drop-top", min=0.0, max=0.99,
                                          help="Top share by poison score kept out of the classifier's training "
                                               f"{default(DetectConfig, 'drop_top')}."),
    classifier_iters: int | None = typer.Option(None, "--classifier-iters", min=1,
                                                help="Poison classifier iterations "
                                                     f"{default(DetectConfig, 'classifier_iters')}."),
    classifier_holdout: float | None = typer.Option(
        None, "--classifier-holdout", min=0.0, max=0.5,
        help="Share of the classifier's training pool held out as extra validation negatives "
             f"{default(DetectConfig, 'classifier_holdout', 'bottom-k only')}."),
    classifier_decoys: float | None = typer.Option(
        None, "--classifier-decoys", min=0.0, max=1.0,
        help="Share of the classifier's clean examples that get a pasted window of another image, so it learns the "
             "trigger rather than the pasting "
             + default(DetectConfig, "classifier_decoys", "0 = PatchSearch's augmentation") + "."),
    classifier_rounds: int | None = typer.Option(
        None, "--classifier-rounds", min=1,
        help="Classifier trainings; each after the first drops the training negatives the last one flags "
             + default(DetectConfig, "classifier_rounds", "1 = the paper's single training") + "."),
    refine_by: str | None = typer.Option(
        None, "--refine-by",
        help="What a refinement round drops from the training negatives: removal (those the removal score, P with "
             "its neighbours' support, would remove, and those the last classifier flags) or p (the latter alone) "
             f"{default(DetectConfig, 'classifier_refine_by')}."),
    neighbours: int | None = typer.Option(
        None, "--neighbours", min=0,
        help="Removal score = the classifier's probability averaged with the support of this many nearest "
             "neighbours in the threat model's feature space (their mean probability above the data set's flag "
             "rate) " + default(DetectConfig, "neighbours", "0 = the probability alone, the paper's decision") + "."),
    verify_min_prob: float | None = typer.Option(
        None, "--verify-min-prob", min=0.0, max=1.0,
        help="Flip-test the window the classifier looks at in each image it flags above this probability that the "
             "neighbour consensus keeps; removed when it moves more flip-set images than every random window cut "
             "from an unflagged image; 1 = off, 0.9 measured in docs/benchmarks.md section 5 "
             f"{default(DetectConfig, 'verify_min_prob')}."),
    match_picture: bool | None = typer.Option(
        None, "--match-picture/--no-match-picture",
        help="When a picture recurs among the top-k windows, remove exactly the images that contain it (their best "
             "window as similar to the group's windows as the recurrence test's bar), whatever the classifier says "
             + default(DetectConfig, "match_picture") + "."),
    ensemble: int | None = typer.Option(None, "--ensemble", min=1,
                                        help="Poison classifiers trained with different seeds and averaged "
                                             + default(DetectConfig, "ensemble", "1 = the paper's single classifier")
                                             + "."),
    min_evidence: float | None = typer.Option(None, "--min-evidence", help="Minimum z (the top-k median's gap over "
                                                                           "random windows, in units of the smaller "
                                                                           "of the top-k's and the bootstrap's "
                                                                           "spread) to remove anything "
                                                                           f"{default(DetectConfig, 'min_evidence')}."),
    min_effect: float | None = typer.Option(None, "--min-effect", min=0.0, max=1.0,
                                            help="Minimum share of the flip-set images random windows leave in "
                                                 "place that the top-k move, to remove anything "
                                                 f"{default(DetectConfig, 'min_effect')}."),
    max_recurrence_p: float | None = typer.Option(
        None, "--max-recurrence-p", min=0.0, max=1.0,
        help="Largest p-value of the recurrence test (the largest group of top-k windows showing one picture, "
             "against groups of random windows) at which a recurring picture stands in for --min-effect "
             + default(DetectConfig, "max_recurrence_p", "0 = the effect alone decides") + "."),
    classifier_positives: str | None = typer.Option(
        None, "--classifier-positives",
        help="Windows the poison classifier learns as the trigger: recurring (the recurrence test's group) or all "
             "(every top-k window, the paper) " + default(DetectConfig, "classifier_positives") + "."),
    null_size: int | None = typer.Option(None, "--null-size", min=1, help="Random windows scored as the evidence "
                                                                          "test's null sample "
                                                                          f"{default(DetectConfig, 'null_size')}."),
    null_pool: str | None = typer.Option(None, "--null-pool",
                                         help="Where the null's random windows come from: all (every image) or "
                                              "outside-topk-clusters (images outside the clusters the top-k come "
                                              "from: fewer windows cut from poisons, but a lower null on clean "
                                              "data; see docs/benchmarks.md 2b) "
                                              f"{default(DetectConfig, 'null_pool')}."),
    feature_dtype: str | None = typer.Option(None, "--feature-dtype",
                                             help="Feature storage: float32 or float16 (half the memory) "
                                                  f"{default(DetectConfig, 'feature_dtype')}."),
    force: bool = typer.Option(False, "--force", help="Train the classifier and remove even without evidence."),
    fail_on: float | None = typer.Option(None, "--fail-on", min=0.0, help="Exit 1 when more images are removed: "
                                                                          "a count (>= 1) or a fraction (< 1)."),
    fail_on_unreadable: int | None = typer.Option(
        None, "--fail-on-unreadable", min=0,
        help="Exit 1 when more samples than this could not be read (and so were not scanned) "
             f"{described('0 with --fail-on', 'not checked without it')}."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run folder from its last finished "
                                                              "stage."),
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
    from poisonscan.report.summary import print_detect_summary

    flags = overrides(
        data=data, model=model, arch=arch, image_size=image_size, out=str(out) if out else None, method=method,
        clusters=clusters, masks=masks, window=parse_window(window), mask_strategy=mask_strategy,
        flip_size=flip_size, samples_per_cluster=samples_per_cluster, drop_fraction=drop_fraction, top_k=top_k,
        drop_top=drop_top, classifier_iters=classifier_iters,
        classifier_holdout=classifier_holdout, classifier_decoys=classifier_decoys,
        classifier_rounds=classifier_rounds, classifier_refine_by=refine_by, neighbours=neighbours,
        verify_min_prob=verify_min_prob, match_picture=match_picture, ensemble=ensemble,
        min_evidence=min_evidence,
        min_effect=min_effect, max_recurrence_p=max_recurrence_p, classifier_positives=classifier_positives,
        null_size=null_size, null_pool=null_pool, feature_dtype=feature_dtype,
        force=_flag(force), fail_on=fail_on, fail_on_unreadable=fail_on_unreadable,
        resume=str(resume) if resume else None, overwrite=_flag(overwrite),
        trust_checkpoint=_flag(trust_checkpoint), device=device, precision=precision, seed=seed,
        batch_size=batch_size, quiet=_flag(quiet))
    if resume is not None:
        if config is not None:
            raise ConfigError("--resume continues with the run's own config.json: give changed settings as flags, "
                              "not --config")
        if not (resume / "config.json").is_file():
            raise UsageError(f"--resume {resume}: not a detect run folder (no config.json)")
        # how this invocation prints is its own: -q (or its absence) wins over a quiet saved in config.json
        cfg = replace(resolve_config(DetectConfig, resume / "config.json", flags), quiet=bool(quiet))
    else:
        cfg = resolve_config(DetectConfig, config, flags)
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
