"""``poisonscan eval``: detection quality, linear-probe ACC/ASR, backdoor strength of a threat model.

Thin layer: flags -> config -> ``poisonscan.eval.runner`` -> JSON on stdout (``--json``) or rich tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from poisonscan.cli.common import handle_errors, overrides
from poisonscan.cli.helptext import default, described, required
from poisonscan.config import CommonConfig, EvalBackdoorConfig, EvalDetectionConfig, EvalProbeConfig
from poisonscan.settings import resolve_config
from poisonscan.report.summary import print_json, print_table

eval_app = typer.Typer(name="eval", help="Evaluate a detection run, a linear probe, or a threat model's backdoor.",
                       no_args_is_help=True, add_completion=False)

_CONFIG = typer.Option(None, "--config", help="TOML/YAML/JSON file of settings (flags override it).")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON on stdout (tables go to stderr).")
_DEVICE = typer.Option(None, "--device", help=f"auto, cpu, cuda, cuda:N {default(CommonConfig, 'device')}.")
_PRECISION = typer.Option(None, "--precision", help="auto, bf16, fp16 or fp32 (autocast of the encoder) "
                                                    f"{default(CommonConfig, 'precision')}.")
_QUIET = typer.Option(None, "--quiet", "-q", help="No progress bars or tables.")
_ARCH = typer.Option(None, "--arch", help="Encoder architecture (needed for foreign checkpoints).")
_SIZE = typer.Option(None, "--image-size", help="Input resolution S " + described("the checkpoint's") + ".")
_TRUST = typer.Option(None, "--trust-checkpoint", help="Allow pickled checkpoints (runs code: trusted files only).")


def _console(as_json: bool) -> Console:
    return Console(stderr=as_json)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


# ----------------------------------------------------------------------------------------------- detection
@eval_app.command("detection")
@handle_errors
def detection(
    run: Optional[Path] = typer.Option(None, "--run",
                                       help=f"Detect run directory (holds scores.csv) {required()}."),
    truth: Optional[Path] = typer.Option(None, "--truth",
                                         help=f"Ground-truth CSV written by `poisonscan poison` {required()}."),
    as_json: bool = _JSON,
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write every metric as CSV (scope, metric, value)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for PNG curves and score distributions."),
    topk: Optional[list[int]] = typer.Option(None, "--topk", help="Retrieved-trigger cut-off (repeatable) "
                                                                  f"{default(EvalDetectionConfig, 'topk')}."),
    device: Optional[str] = typer.Option(None, "--device", help="Accepted like every command's; the metrics run "
                                                                f"no model {default(EvalDetectionConfig, 'device')}."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Accepted like every command's; the metrics draw "
                                                            "nothing at random "
                                                            f"{default(EvalDetectionConfig, 'seed')}."),
    quiet: Optional[bool] = typer.Option(None, "--quiet", "-q", help="No tables (warnings still go to stderr)."),
    config: Optional[Path] = _CONFIG,
) -> None:
    """Recall, precision, F1, AUROC/AUPRC, TPR@FPR, precision@k and top-k trigger accuracy of a detect run."""
    from poisonscan.eval.runner import run_detection

    cfg = resolve_config(EvalDetectionConfig, config, overrides(
        run=str(run) if run else None, truth=str(truth) if truth else None, csv=str(csv_out) if csv_out else None,
        plots=str(plots) if plots else None, topk=list(topk) if topk else None, device=device, seed=seed,
        quiet=quiet))
    result = run_detection(cfg)
    if as_json:
        print_json(result)
    if not cfg.quiet:
        _print_detection(result, _console(as_json))
    else:
        for w in result["warnings"]:
            typer.echo(f"warning: {w}", err=True)


def _print_detection(r: dict[str, Any], console: Console) -> None:
    c, rem = r["counts"], r["removal"]
    print_table("Detection (Table II)", [{
        "samples": c["samples"], "poisoned": c["poisoned"], "removed": rem["removed"], "recall": _pct(rem["recall"]),
        "precision": _pct(rem["precision"]), "F1": _pct(rem["f1"])}], console)
    rows = []
    for name, m in r["scores"].items():
        if m is None:
            continue
        row = {"score": name, "AUROC": m["auroc"], "AUPRC": m["auprc"]}
        row.update({f"TPR@{float(f) * 100:g}%FPR": v for f, v in m["tpr_at_fpr"].items()})
        row[f"prec@{m['k']}"] = m["precision_at_k"]
        rows.append(row)
    if rows:
        print_table(f"Per-sample scores ({c['scored']} scored, {c['scored_poisoned']} of them poisoned)", rows,
                    console)
    trig = r["triggers"]
    print_table(f"Retrieved candidate triggers ({trig['candidates']})",
                [{"top": int(k), "n": v["n"], "accuracy": _pct(v["accuracy"]), "mean IoU": v["mean_iou"],
                  "catch rate": _pct(v["catch_rate"])} for k, v in trig["topk"].items()], console)
    console.print(f"true boxes: {trig['box_mapping']}", markup=False, highlight=False)
    if len(r["per_target"]) > 1:
        k = "20" if "20" in r["per_target"][0]["topk"] else next(iter(r["per_target"][0]["topk"]), None)
        print_table("Per target", [{
            "target": t["target_name"], "poisoned": t["poisoned"], "recall": _pct(t["recall"]),
            "AUROC": (t["poison_score"] or {}).get("auroc"),
            **({f"top-{k} acc.": _pct(t["topk"][k]["accuracy"]), f"top-{k} CR": _pct(t["topk"][k]["catch_rate"])}
               if k else {})} for t in r["per_target"]], console)
    for w in r["warnings"]:
        console.print(f"warning: {w}", markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------- probe
@eval_app.command("probe")
@handle_errors
def probe(
    model: Optional[Path] = typer.Option(None, "--model", help=f"Encoder checkpoint (safetensors) {required()}."),
    train: Optional[str] = typer.Option(None, "--train", help=f"Clean labelled training set {required()}."),
    val: Optional[str] = typer.Option(None, "--val", help=f"Clean labelled validation set {required()}."),
    val_patched: Optional[str] = typer.Option(None, "--val-patched",
                                              help="Patched validation set (labelled; or --trigger)."),
    trigger: Optional[list[Path]] = typer.Option(None, "--trigger", help="Build the patched val in memory with this "
                                                 "trigger (one for all targets, or one per --target; or "
                                                 "--val-patched)."),
    target: Optional[list[str]] = typer.Option(None, "--target",
                                               help=f"Target class (name or index; repeatable) {required()}."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Labelled fraction of train "
                                                                      f"{default(EvalProbeConfig, 'fraction')}."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Probe epochs on the cached features "
                                                                f"{default(EvalProbeConfig, 'epochs')}."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer",
                                            help=f"sgd or adam {default(EvalProbeConfig, 'optimizer')}."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the subset, the probe and the trigger corners "
                                                            f"{default(EvalProbeConfig, 'seed')}."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory, reused with its cached features "
                                                           f"{described('runs/eval-probe/runN')}."),
    arch: Optional[str] = _ARCH, image_size: Optional[int] = _SIZE, trust_checkpoint: Optional[bool] = _TRUST,
    device: Optional[str] = _DEVICE, precision: Optional[str] = _PRECISION, quiet: Optional[bool] = _QUIET,
    as_json: bool = _JSON, config: Optional[Path] = _CONFIG,
) -> None:
    """Linear probe on the frozen encoder: ACC on clean/patched val, FP of the target, ASR, confusion matrices."""
    cfg = resolve_config(EvalProbeConfig, config, overrides(
        model=str(model) if model else None, train=train, val=val, val_patched=val_patched,
        triggers=[str(t) for t in trigger] if trigger else None, targets=list(target) if target else None,
        fraction=fraction, epochs=epochs, optimizer=optimizer, seed=seed, out=str(out) if out else None, arch=arch,
        image_size=image_size, trust_checkpoint=trust_checkpoint, device=device, precision=precision, quiet=quiet))
    from poisonscan.eval.runner import run_probe

    result = run_probe(cfg)
    if result is None:
        return
    if as_json:
        print_json(result)
    if not cfg.quiet:
        _print_probe(result, _console(as_json))


def _print_probe(r: dict[str, Any], console: Console) -> None:
    print_table("Linear probe", [{"set": "train (labelled subset)", "images": r["train"]["n_labelled"], "ACC": None},
                                 {"set": "clean val", "images": r["val"]["n"], "ACC": _pct(r["acc_clean"])}] +
                [{"set": p["name"], "images": p["n"], "ACC": _pct(p["accuracy"])} for p in r["patched"]], console)
    print_table("Target", [{"target": t["name"], "FP clean": t["fp_clean"], "FP patched": t.get("fp_patched"),
                            "non-target": t.get("non_target_patched", t["non_target_clean"]),
                            "ASR": _pct(t.get("asr"))} for t in r["targets"]], console)
    console.print(f"run: {r['run_dir']}", markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------- backdoor
@eval_app.command("backdoor")
@handle_errors
def backdoor(
    model: Optional[Path] = typer.Option(None, "--model",
                                         help=f"Threat model checkpoint (safetensors) {required()}."),
    data: Optional[str] = typer.Option(None, "--data", help=f"Labelled clean validation set {required()}."),
    trigger: Optional[Path] = typer.Option(None, "--trigger",
                                           help=f"The attack's trigger image {required('--attack ctrl')}."),
    target: Optional[str] = typer.Option(None, "--target", help=f"Target class (name or index) {required()}."),
    train: Optional[str] = typer.Option(None, "--train", help="The (poisoned) training set: k-NN bank, probe, "
                                        "clusters, oracle flips."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Ground truth of --train: cluster purity."),
    k: Optional[int] = typer.Option(None, "--k", help=f"k-NN neighbours {default(EvalBackdoorConfig, 'k')}."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="k-means clusters (capped at N // 50) "
                                                                    f"{default(EvalBackdoorConfig, 'clusters')}."),
    trigger_size: Optional[float] = typer.Option(None, "--trigger-size", help="Trigger side on val: pixels "
                                                 "(>= 1) or fraction of the side (< 1) "
                                                 f"{default(EvalBackdoorConfig, 'trigger_size')}."),
    attack: Optional[str] = typer.Option(None, "--attack", help="How the trigger is applied: patch, blend (the "
                                         "trigger over the whole image) or ctrl (spectral; no --trigger) "
                                         f"{default(EvalBackdoorConfig, 'attack')}."),
    blend_alpha: Optional[float] = typer.Option(None, "--blend-alpha",
                                                help="Blend: trigger weight "
                                                     f"{default(EvalBackdoorConfig, 'blend_alpha')}."),
    ctrl_magnitude: Optional[float] = typer.Option(None, "--ctrl-magnitude", help="CTRL magnitude "
                                                   + default(EvalBackdoorConfig, "ctrl_magnitude",
                                                             "the reference's test-set value") + "."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of trigger corners, k-means and probe "
                                                            f"{default(EvalBackdoorConfig, 'seed')}."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory, reused with its cached features "
                                                           f"{described('runs/eval-backdoor/runN')}."),
    arch: Optional[str] = _ARCH, image_size: Optional[int] = _SIZE, trust_checkpoint: Optional[bool] = _TRUST,
    device: Optional[str] = _DEVICE, precision: Optional[str] = _PRECISION, quiet: Optional[bool] = _QUIET,
    as_json: bool = _JSON, config: Optional[Path] = _CONFIG,
) -> None:
    """Backdoor strength: k-NN ACC and ASR, probe ASR, purity of the poison clusters, oracle flips."""
    cfg = resolve_config(EvalBackdoorConfig, config, overrides(
        model=str(model) if model else None, data=data, trigger=str(trigger) if trigger else None, target=target,
        train=train, truth=str(truth) if truth else None, k=k, clusters=clusters, trigger_size=trigger_size,
        attack=attack, blend_alpha=blend_alpha, ctrl_magnitude=ctrl_magnitude, seed=seed,
        out=str(out) if out else None, arch=arch, image_size=image_size, trust_checkpoint=trust_checkpoint,
        device=device, precision=precision, quiet=quiet))
    from poisonscan.eval.runner import run_backdoor

    result = run_backdoor(cfg)
    if result is None:
        return
    if as_json:
        print_json(result)
    if not cfg.quiet:
        _print_backdoor(result, _console(as_json))
    else:
        for w in result.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)


def _print_backdoor(r: dict[str, Any], console: Console) -> None:
    knn, pr, cl, fl = r["knn"], r["probe"], r["clusters"], r["flips"]
    rows = [{"measure": f"k-NN accuracy, clean val (k={knn['k']}, bank {knn['bank']})", "value": _pct(knn["accuracy"])},
            {"measure": "non-target val predicted as target: clean -> patched",
             "value": f"{_pct(knn['target_rate_clean'])} -> {_pct(knn['asr'])}"}]
    if pr:
        rows += [{"measure": f"linear probe ({pr['n_train']} labelled): ACC clean / patched",
                  "value": f"{_pct(pr['accuracy'])} / {_pct(pr['accuracy_patched'])}"},
                 {"measure": "linear probe ASR", "value": _pct(pr["asr"])}]
    if cl and cl.get("purity") is not None:
        rows += [{"measure": f"purity of the 3 clusters holding most poisons (l={cl['n_clusters']})",
                  "value": _pct(cl["purity"])},
                 {"measure": "share of poisons in those clusters", "value": _pct(cl["poison_share"])}]
    if fl:
        rows.append({"measure": f"real trigger on the {fl['flip_set']} flip-set images: assignments changed",
                     "value": str(fl["changed"])})
    print_table(f"Backdoor strength, target {r['target_name']}", rows, console)
    for w in r.get("warnings", []):
        console.print(f"warning: {w}", markup=False, highlight=False)
    console.print(f"run: {r['run_dir']}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``eval`` sub-app to the main app."""
    app.add_typer(eval_app, name="eval")


__all__ = ["eval_app", "register"]
