r"""End-to-end benchmark: poison -> pretrain -> detect (PoisonCAM and PatchSearch) -> eval -> clean -> retrain -> probe.

Prints a table and writes ``results.json`` (machine, versions, seeds, commit with every result). Settings per
configuration are documented in benchmarks/results/notebook.md. Each step is skipped when its output already exists, so an
interrupted benchmark resumes. ``--retrain`` pretrains again on each cleaned manifest (same recipe) and probes the
result (k-NN ASR and linear probes); compare its ASR with ``--clean-control``'s (a model trained on data with no
poison; give it the poisoned run's ``--data-dir`` so both are probed on the same patched val).

    python benchmarks/run_pipeline.py --config imagenette-96 [--epochs 40] [--work .bench/imagenette] [--retrain]
    python benchmarks/run_pipeline.py --config imagenette-96 --data-dir D --model M.safetensors  # reuse both
    python benchmarks/run_pipeline.py --config cifar10 --epochs 60
    python benchmarks/run_pipeline.py --config imagenette-96 --clean-control --data-dir D   # no poison planted
    python benchmarks/run_pipeline.py --config cifar10 --rate 1.0 --pair 3=trigger_12.png   # other rate, pair
    python benchmarks/run_pipeline.py --config imagenette-96 --scale paper --data /data/imagenet100/train \
        --val /data/imagenet100/val --pair n02869837=trigger_10.png   # the GPU setting (ImageNet-100, ViT-B)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from poisonscan.attacks.poison import poison_dataset
from poisonscan.attacks.presets import get_preset, preset_values, shared_data_root
from poisonscan.chain import ChainSpec, run_chain
from poisonscan.config import PoisonConfig
from poisonscan.runs import atomic_write_json, environment_record

CONFIGS: dict[str, dict[str, Any]] = {
    # like STL-10 in the paper: 10 classes, 96 px images, 50% of one class poisoned (5% of the data)
    "imagenette-96": {"preset": "imagenette-96", "image_size": 64, "arch": "resnet18", "epochs": 40,
                      "trigger_size_eval": 50 / 224},
    # all 50,000 CIFAR-10 training images at 32 px. A CPU budget of 60 minutes: 15 epochs (750k image pairs, about
    # as many SGD steps as the demo's 100 epochs on 5,000), and the search at l = 250 clusters with a flip set of 250
    # (paper: 1000 / 1000, about 10M masked forwards, 90 CPU minutes for the search alone; docs/scaling.md)
    "cifar10": {"preset": "cifar10", "image_size": 32, "arch": "resnet18", "epochs": 15, "trigger_size_eval": 8.0,
                "detect": {"clusters": 250, "flip_size": 250}},
    # 100 classes at 32 px, 0.5% of the data poisoned with a trigger no default was chosen on: a held-out setting
    # (the same CPU budget and detect settings as cifar10)
    "tinyimagenet100": {"preset": "tinyimagenet100", "image_size": 32, "arch": "resnet18", "epochs": 15,
                        "trigger_size_eval": 8.0, "detect": {"clusters": 250, "flip_size": 250}},
    # the paper's threat model in small: MoCo v3 with a ViT-Tiny of patch 4 (8 x 8 tokens at 32 px), AdamW. On 2 CPU
    # cores it trains at about 27 images/s: 24 epochs of a 5,000-image CIFAR-10 shard take about 75 minutes
    # (--data one train shard, --val a test shard, --pair 3=trigger_12.png). On a GPU, --epochs 200 on all 50,000.
    "cifar10-vit": {"preset": "cifar10", "image_size": 32, "arch": "vit_tiny_p4", "method": "mocov3", "epochs": 24,
                    "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 3, "proj_hidden": 1024,
                    "trigger_size_eval": 50 / 224},
}
PAPER_SCALE = {"note": "ImageNet-100, ViT-B/16 MoCo v3, 200 epochs, 224 px, l=1000, B=256, w=60 (GPU machines)",
               "pretrain": {"method": "mocov3", "arch": "vit_base_patch16_224", "image_size": 224, "epochs": 200,
                            "batch_size": 1024}}


def _step(name: str, out: Path, fn: Any, timings: dict[str, float]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    took = round(time.perf_counter() - t0, 1)
    timings[name] = max(took, timings.get(name, 0.0))         # a resumed step keeps the time it first took
    print(f"[bench] {name}: {timings[name]} s", flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    conf = dict(CONFIGS[args.config])
    if args.scale == "paper":
        conf.update(PAPER_SCALE["pretrain"])
    epochs = args.epochs or conf["epochs"]
    work = args.work or Path(".bench") / f"{args.config}{'-control' if args.clean_control else ''}-e{epochs}"
    work.mkdir(parents=True, exist_ok=True)
    old = work / "results.json"
    timings: dict[str, float] = json.loads(old.read_text()).get("timings", {}) if old.exists() else {}
    values = _attack_values(conf["preset"], args)
    if args.clean_control:
        values["rate"] = None
        values["dataset_rate"] = None
    poisoned = args.data_dir or work / "data"
    if not args.clean_control and not (poisoned / "summary.json").exists():
        _step("poison", work, lambda: poison_dataset(PoisonConfig(out=str(poisoned), seed=args.seed, **{
            k: v for k, v in values.items() if k in PoisonConfig.__dataclass_fields__ and k != "seed"}),
            quiet=True), timings)
    train_spec = values["data"] if args.clean_control else str(poisoned / "train")
    truth = None if args.clean_control else str(poisoned / "ground_truth.csv")
    val_spec, val_patched = values["val"], str(poisoned / "val_patched")
    if not Path(val_patched).exists():
        val_patched = None          # clean control without --data-dir: the probe pastes the trigger in memory
    trigger = values["targets"][0].split("=", 1)[1]
    target = values["targets"][0].split("=", 1)[0]

    recipe = {**_recipe(conf), "epochs": epochs, "store_cache": str(work / "cache-train")}
    chain = run_chain(ChainSpec(
        work=work, train=train_spec, val=val_spec, trigger=trigger, target=target,
        trigger_size=conf["trigger_size_eval"], truth=truth, val_patched=val_patched, labelled_train=values["data"],
        model=str(args.model) if args.model else None, recipe=recipe, methods=tuple(args.methods),
        detect={} if args.scale == "paper" else dict(conf.get("detect", {})),
        probe_fractions=() if args.no_probe else tuple(args.fractions),
        retrain_epochs=epochs if args.retrain and not args.clean_control else 0, seed=args.seed, resume=True,
        say=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)))
    for name, took in chain["timings"].items():     # a resumed step keeps the time it first took
        timings[name] = max(round(took, 1), timings.get(name, 0.0))
    model, strength = chain["model"], chain["strength"]
    rows: dict[str, Any] = {}
    for method, scan in chain["detect"].items():
        det, q = scan["summary"], scan["quality"]
        row: dict[str, Any] = {"removed": det["counts"]["removed"], "evidence": det.get("evidence"),
                               "verdict": det.get("verdict"), "top_k": det.get("top_k"),
                               "timings": det.get("timings")}
        if q:
            row.update({"recall": q["removal"]["recall"], "precision": q["removal"]["precision"],
                        "auroc": q["scores"]["poison_score"]["auroc"],
                        "auroc_classifier": (q["scores"].get("classifier_prob") or {}).get("auroc"),
                        "auroc_picture_match": (q["scores"].get("picture_match") or {}).get("auroc"),
                        "top20_trigger_accuracy": q["triggers"]["topk"].get("20", {}).get("accuracy")})
        if "retrained" in scan:
            row["retrained"] = _retrained_row(scan["retrained"])
        rows[method] = row
    name = "clean_data" if args.clean_control else "no_defence"
    probes = {f"{name}@{frac}": _brief(p) for frac, p in chain["probes"].items()}
    result = {"config": args.config, "settings": conf, "epochs": epochs, "seed": args.seed, "model": str(model),
              "rate": values.get("rate"), "targets": values["targets"],
              "clean_control": args.clean_control,
              "threat_model": {"knn": strength.get("knn"), "clusters": strength.get("clusters"),
                               "flips": strength.get("flips")} if strength else None,
              "detection": rows, "probe": probes, "timings": timings, "environment": environment_record(args.seed)}
    atomic_write_json(work / "results.json", result)
    _print(result)
    return result


def _recipe(conf: dict[str, Any]) -> dict[str, Any]:
    """The threat model's ``PretrainConfig`` values of a configuration (``--scale paper``: MoCo v3, ViT-B)."""
    return {k: conf[k] for k in ("arch", "image_size", "method", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                 "proj_hidden") if k in conf}


def _attack_values(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The preset's ``PoisonConfig`` values with the flags applied: ``--data``/``--val`` (own data, e.g. ImageNet-100
    on a GPU machine; then the shared data folder is not needed when ``--pair`` names a trigger file), ``--rate``,
    ``--pair CLASS=TRIGGER`` (a bare file name is looked up beside the preset's trigger)."""
    if args.data and args.val and args.pair and not shared_data_root(args.shared_data).is_dir():
        values = {**get_preset(preset).values, "targets": []}
    else:
        values = preset_values(preset, args.shared_data)
    if args.data:
        values.update(data=args.data, val=args.val or values["val"])
    if args.rate is not None:
        values["rate"] = args.rate
    if args.pair:
        cls, trig = args.pair.split("=", 1)
        trig_path = Path(trig)
        if not trig_path.exists() and values["targets"]:       # a bare file name: beside the preset's trigger
            trig_path = Path(values["targets"][0].split("=", 1)[1]).parent / trig
        values["targets"] = [f"{cls}={trig_path}"]
    return values


def _brief(p: dict[str, Any]) -> dict[str, Any]:
    """A linear probe's ACC on clean and patched val, the target's ASR and the share of clean non-target val images
    it already calls the target (``clean_rate``: the ASR's baseline)."""
    t = (p.get("targets") or [{}])[0]
    return {"acc_clean": p.get("acc_clean"), "acc_patched": p.get("acc_patched"), "asr": t.get("asr"),
            "clean_rate": t.get("fp_rate_clean")}


def _retrained_row(r: dict[str, Any]) -> dict[str, Any]:
    """The record of a model pretrained again on a cleaned manifest: its k-NN backdoor, clusters and probes."""
    if "skipped" in r:
        return r
    strength = r["strength"]
    row = {"model": r["model"], "knn": strength.get("knn"), "clusters": strength.get("clusters"),
           "probe": {str(frac): _brief(p) for frac, p in r["probes"].items()}, "warnings": strength.get("warnings", [])}
    if "strength_original_bank" in r:
        row["knn_original_bank"] = r["strength_original_bank"].get("knn")
    return row


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _print(r: dict[str, Any]) -> None:
    tm = r["threat_model"] or {}
    knn = tm.get("knn") or {}
    print(f"\n{r['config']} (epochs {r['epochs']}, seed {r['seed']}{', clean control' if r['clean_control'] else ''})")
    print(f"threat model: k-NN acc {knn.get('accuracy')}, k-NN ASR {knn.get('asr')}, "
          f"purity {(tm.get('clusters') or {}).get('purity')}, oracle flips {(tm.get('flips') or {})}")
    print(f"{'method':<12}{'removed':>8}{'recall':>8}{'prec':>8}{'AUROC':>8}{'top20':>8}{'z':>7}{'effect':>8}")
    for m, row in r["detection"].items():
        ev = row.get("evidence") or {}
        print(f"{m:<12}{row['removed']:>8}{row.get('recall', float('nan')):>8.3f}"
              f"{row.get('precision', float('nan')):>8.3f}{_num(row.get('auroc')):>8.3f}"
              f"{_num(row.get('top20_trigger_accuracy')):>8.2f}{ev.get('z', float('nan')):>7.1f}"
              f"{_num(ev.get('effect')):>8.3f}")
    for k, p in r["probe"].items():
        print(f"probe {k}: ACC clean {p['acc_clean']}, ACC patched {p['acc_patched']}, ASR {p['asr']} "
              f"(clean rate {p.get('clean_rate')})")
    for m, row in r["detection"].items():
        retrained = row.get("retrained") or {}
        for bank in ("knn", "knn_original_bank"):
            knn = retrained.get(bank)
            if knn:
                print(f"retrained after {m}{' (bank: the original data)' if bank != 'knn' else ''}: k-NN acc "
                      f"{knn.get('accuracy')}, k-NN ASR {knn.get('asr')} (clean rate {knn.get('target_rate_clean')})")
        for w in retrained.get("warnings", []):
            print(f"warning (retrained after {m}): {w}")
        for frac, p in (retrained.get("probe") or {}).items():
            print(f"probe retrained after {m}@{frac}: ACC clean {p['acc_clean']}, ACC patched {p['acc_patched']}, "
                  f"ASR {p['asr']} (clean rate {p.get('clean_rate')})")
    print("timings:", r["timings"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="imagenette-96")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--shared-data", default=None)
    ap.add_argument("--methods", nargs="+", default=["poisoncam", "patchsearch"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    ap.add_argument("--clean-control", action="store_true", help="plant no poison (how much is removed?)")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--retrain", action="store_true", help="pretrain again on each cleaned manifest and probe it")
    ap.add_argument("--model", type=Path, default=None, help="threat model to use (skips pretraining)")
    ap.add_argument("--data-dir", type=Path, default=None, help="poisoned data made earlier by the same preset")
    ap.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                    help="paper: the paper's pretraining recipe and detect defaults (GPU machines)")
    ap.add_argument("--data", default=None, help="own training data instead of the preset's (with --val, --pair)")
    ap.add_argument("--val", default=None, help="own validation data (labelled) instead of the preset's")
    ap.add_argument("--rate", type=float, default=None, help="share of the target class poisoned (preset: 0.5)")
    ap.add_argument("--pair", default=None, metavar="CLASS=TRIGGER",
                    help="another trigger/target pair (a trigger file name is looked up beside the preset's)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
