"""The ``eval`` commands as library calls on resolved configs: inputs -> metrics -> files of the eval run.

``run_detection``, ``run_probe`` and ``run_backdoor`` do the work of ``poisonscan eval detection | probe | backdoor``
(the CLI only parses flags and prints); ``demo`` and scripts may call them directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save as safetensors_bytes

from poisonscan.config import EvalBackdoorConfig, EvalDetectionConfig, EvalProbeConfig
from poisonscan.data.sources import Source, open_source
from poisonscan.errors import UsageError
from poisonscan.eval.backdoor import backdoor_strength
from poisonscan.eval.detection import detection_plots, evaluate_detection, flatten_metrics, read_run, read_truth
from poisonscan.eval.encoding import encode_source, file_digest
from poisonscan.eval.patching import ATTACKS, apply_trigger_batch, paste_trigger_batch, read_trigger
from poisonscan.eval.probe import (check_labels, confusion_csv, linear_probe, probe_report, resolve_class,
                                   stratified_subset)
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runs import RunDir, atomic_write_bytes, atomic_write_text, create_run, releases_run_locks
from poisonscan.runtime import Runtime, broadcast_object, seed_everything, setup_runtime

__all__ = ["run_detection", "run_probe", "run_backdoor"]


def run_detection(cfg: EvalDetectionConfig) -> dict[str, Any]:
    """``eval detection``: metrics of a detect run vs. ground truth; writes ``cfg.csv`` and ``cfg.plots`` if set."""
    if not cfg.run or not cfg.truth:
        raise UsageError("eval detection needs --run RUN and --truth GROUND_TRUTH.csv")
    run_scores, gt = read_run(cfg.run), read_truth(cfg.truth)
    result = evaluate_detection(run_scores, gt, topk=cfg.topk, fprs=cfg.fpr)
    files: dict[str, str] = {}
    if cfg.csv:
        rows = flatten_metrics(result)
        text = "scope,metric,value\n" + "".join(f"{_csv_cell(r['scope'])},{r['metric']},{r['value']}\n"
                                                for r in rows)
        files["csv"] = str(atomic_write_text(cfg.csv, text))
    if cfg.plots:
        for name, png in detection_plots(run_scores, gt).items():
            atomic_write_bytes(Path(cfg.plots) / name, png)
        files["plots"] = cfg.plots
    result["files"] = files
    return result


def _setup(cfg: EvalProbeConfig | EvalBackdoorConfig, command: str) -> tuple[Runtime, Any, RunDir, str]:
    """Runtime, encoder, run directory (locked on the main rank until the command ends) and encoder cache key of a
    probe/backdoor command."""
    runtime = setup_runtime(cfg.device, cfg.precision)
    seed_everything(cfg.seed)
    encoder, _ = load_encoder(cfg.model, cfg.arch, cfg.image_size, trust_pickle=cfg.trust_checkpoint)
    encoder_key = f"{file_digest(cfg.model)}:{encoder.arch}:{encoder.image_size}"
    made = create_run(command, cfg.out, resume=cfg.out is not None) if runtime.is_main else None
    if made is not None:
        made.write_config(cfg)
        made.write_environment(cfg.seed, runtime)
    # every rank reads the feature cache (only the main rank writes it)
    path = broadcast_object(str(made.path) if made is not None else None)
    run = made if made is not None else RunDir(path)
    return runtime, encoder, run, encoder_key


def _open(spec: str, what: str) -> Source:
    if not spec:
        raise UsageError(f"give the {what}")
    return open_source(spec)


@releases_run_locks
def run_probe(cfg: EvalProbeConfig) -> dict[str, Any] | None:
    """``eval probe``: linear probe ACC/FP/ASR; writes the run directory; the summary on the main rank (else None)."""
    if not cfg.model or not cfg.train or not cfg.val:
        raise UsageError("eval probe needs --model, --train and --val")
    if not cfg.targets:
        raise UsageError("give at least one --target CLASS")
    if cfg.val_patched and cfg.triggers:
        raise UsageError("give --val-patched or --trigger, not both")
    if cfg.triggers and len(cfg.triggers) not in (1, len(cfg.targets)):
        raise UsageError(f"give one --trigger for all targets or one per --target ({len(cfg.targets)})")
    train_src, val_src = _open(cfg.train, "--train set"), _open(cfg.val, "--val set")
    train_labels = check_labels(train_src.labels, f"--train {cfg.train}")
    class_names = train_src.class_names or val_src.class_names
    targets = [resolve_class(t, class_names, train_src.root) for t in cfg.targets]
    triggers = [(path, read_trigger(path), file_digest(path)) for path in cfg.triggers]
    patched_src = _open(cfg.val_patched, "--val-patched set") if cfg.val_patched else None
    if patched_src is not None:
        check_labels(patched_src.labels, f"--val-patched {cfg.val_patched}")
    check_labels(val_src.labels, f"--val {cfg.val}")

    runtime, encoder, run, key = _setup(cfg, "eval-probe")
    subset = stratified_subset(train_labels, cfg.fraction, cfg.seed)
    enc = dict(runtime=runtime, encoder_key=key, run=run, batch_size=cfg.batch_size, quiet=cfg.quiet)
    tr = encode_source(encoder, train_src, name="train", indices=subset, **enc)
    variants = {f"patched{i}": (lambda imgs, trig=trig: paste_trigger_batch(
        imgs, trig, size=cfg.trigger_size, margin=cfg.margin, seed=cfg.seed)[0],
        {"trigger": digest, "size": cfg.trigger_size, "margin": cfg.margin, "seed": cfg.seed})
        for i, (_, trig, digest) in enumerate(triggers)}
    va = encode_source(encoder, val_src, name="val", variants=variants, **enc)
    val_labels = check_labels(va.labels, f"--val {cfg.val}")
    n_classes = max(int(train_labels.max()), int(val_labels.max())) + 1
    n_classes = max(n_classes, len(class_names or []))
    model = linear_probe(tr.features["clean"], check_labels(tr.labels, "train subset"), n_classes,
                         epochs=cfg.epochs, batch_size=cfg.probe_batch, lr=cfg.lr, optimizer=cfg.optimizer,
                         seed=cfg.seed)
    names = list(class_names) if class_names else [str(i) for i in range(n_classes)]
    # one patched set per trigger (or the given --val-patched); each target is evaluated on its own set
    sets: list[tuple[str, str | None, np.ndarray | None, np.ndarray | None, list[int]]] = []
    if patched_src is not None:
        pa = encode_source(encoder, patched_src, name="val_patched", **enc)
        sets.append(("val_patched", cfg.val_patched, pa.features["clean"], check_labels(pa.labels, "--val-patched"),
                     targets))
    elif triggers:
        for i, (path, _, _) in enumerate(triggers):
            mine = targets if len(triggers) == 1 else [targets[i]]
            sets.append((f"patched{i}", path, va.features[f"patched{i}"], val_labels, mine))
    else:
        sets.append(("none", None, None, None, targets))
    if not runtime.is_main:
        return None
    reports = [probe_report(model, va.features["clean"], val_labels, tg, pf, pl, names) for _, _, pf, pl, tg in sets]
    result: dict[str, Any] = {
        "command": "eval probe", "run_dir": str(run.path), "model": cfg.model, "image_size": encoder.image_size,
        "train": {"spec": cfg.train, "n_labelled": len(tr.ids), "fraction": cfg.fraction, "errors": len(tr.errors)},
        "val": {"spec": cfg.val, "n": len(va.ids), "errors": len(va.errors)},
        "probe": {"epochs": cfg.epochs, "optimizer": cfg.optimizer, "batch_size": cfg.probe_batch, "lr": cfg.lr,
                  "seed": cfg.seed},
        "acc_clean": reports[0]["clean"]["accuracy"],
        "acc_patched": reports[0]["patched"]["accuracy"] if reports[0]["patched"] else None,
        "clean": {k: v for k, v in reports[0]["clean"].items() if k != "confusion"},
        "patched": [], "targets": [], "class_names": names,
    }
    run.write_text("confusion_clean.csv", confusion_csv(reports[0]["clean"]["confusion"], names))
    for (name, origin, _, _, _), rep in zip(sets, reports):
        if rep["patched"] is not None:
            run.write_text(f"confusion_{name}.csv", confusion_csv(rep["patched"]["confusion"], names))
            result["patched"].append({"name": name, "source": origin, "n": rep["patched"]["n"],
                                      "accuracy": rep["patched"]["accuracy"], "confusion": f"confusion_{name}.csv"})
        result["targets"] += [{**t, "patched_set": name if rep["patched"] else None} for t in rep["targets"]]
    run.write_bytes("probe.safetensors", safetensors_bytes(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        metadata={"n_classes": str(n_classes), "class_names": json.dumps(names)}))
    run.write_text("metrics.csv", _metrics_csv(result))
    run.write_json("summary.json", result)
    return result


def _metrics_csv(result: dict[str, Any]) -> str:
    lines = ["set,target,metric,value", f"clean,,accuracy,{result['acc_clean']}"]
    lines += [f"{p['name']},,accuracy,{p['accuracy']}" for p in result["patched"]]
    for t in result["targets"]:
        for key in ("fp_clean", "fp_rate_clean", "fp_patched", "asr"):
            if key in t:
                where = "clean" if key.endswith("clean") else t["patched_set"]
                lines.append(f"{where},{_csv_cell(t['name'])},{key},{t[key]}")
    return "\n".join(lines) + "\n"


@releases_run_locks
def run_backdoor(cfg: EvalBackdoorConfig) -> dict[str, Any] | None:
    """``eval backdoor``: backdoor strength of the threat model; writes the run directory; the summary on the main
    rank (None elsewhere)."""
    if cfg.attack not in ATTACKS:
        raise UsageError(f"--attack {cfg.attack}: choose one of {', '.join(ATTACKS)}")
    if not cfg.model or not cfg.data or cfg.target == "" or not (cfg.trigger or cfg.attack == "ctrl"):
        raise UsageError("eval backdoor needs --model, --data, --trigger and --target (--trigger not with ctrl)")
    if cfg.truth and not cfg.train:
        raise UsageError("--truth describes the training set: give --train too")
    val_src = _open(cfg.data, "--data set")
    check_labels(val_src.labels, f"--data {cfg.data}")
    train_src = _open(cfg.train, "--train set") if cfg.train else None
    names = val_src.class_names or (train_src.class_names if train_src else None)
    target = resolve_class(cfg.target, names, val_src.root)
    trig = read_trigger(cfg.trigger) if cfg.trigger else None
    gt = read_truth(cfg.truth) if cfg.truth else None
    attack = {"attack": cfg.attack, "blend_alpha": cfg.blend_alpha, "ctrl_magnitude": cfg.ctrl_magnitude,
              "ctrl_block": cfg.ctrl_block or None}

    runtime, encoder, run, key = _setup(cfg, "eval-backdoor")
    enc = dict(runtime=runtime, encoder_key=key, run=run, batch_size=cfg.batch_size, quiet=cfg.quiet,
               keep_images=True)
    params = {"trigger": file_digest(cfg.trigger) if cfg.trigger else None, "size": cfg.trigger_size,
              "margin": cfg.margin, "seed": cfg.seed, **({} if cfg.attack == "patch" else attack)}
    patch = (lambda imgs: apply_trigger_batch(imgs, trig, size=cfg.trigger_size, margin=cfg.margin, seed=cfg.seed,
                                              **attack), params)
    va = encode_source(encoder, val_src, name="val", variants={"patched": patch}, **enc)
    tr = encode_source(encoder, train_src, name="train", **enc) if train_src is not None else None
    mask = None
    if gt is not None and tr is not None:
        rows = gt.rows_of(tr.ids)            # a cleaned manifest's full paths match the truth's relative ids
        if (rows < 0).any():
            absent = [tr.ids[i] for i in np.flatnonzero(rows < 0)]
            raise UsageError(f"{len(absent)} training sample(s) are not in the ground truth {cfg.truth} "
                             f"(e.g. {absent[0]!r}): is it the truth of this data set?")
        mask = gt.poisoned[rows]
    result = backdoor_strength(
        encoder, tr.store if tr else None, va.store, trig, target, runtime, mask, k=cfg.k,
        temperature=cfg.temperature, trigger_size=cfg.trigger_size, margin=cfg.margin, seed=cfg.seed,
        n_clusters=cfg.clusters, probe_fraction=cfg.fraction, probe_epochs=cfg.epochs, batch_size=cfg.batch_size,
        train_feats=tr.features["clean"] if tr else None, val_feats=va.features["clean"],
        patched_feats=va.features["patched"], quiet=cfg.quiet, attack=attack)
    if not runtime.is_main:
        return None
    result = {"command": "eval backdoor", "run_dir": str(run.path), "model": cfg.model, "val": cfg.data,
              "train": cfg.train, "truth": cfg.truth, "target_input": cfg.target, "attack": cfg.attack, **result}
    run.write_json("summary.json", result)
    run.write_text("metrics.csv", _backdoor_csv(result))
    return result


def _backdoor_csv(r: dict[str, Any]) -> str:
    lines = ["group,metric,value"]
    for group in ("knn", "probe", "clusters", "flips"):
        for key, value in (r.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
                lines.append(f"{group},{key},{'' if value is None else value}")
    return "\n".join(lines) + "\n"


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
