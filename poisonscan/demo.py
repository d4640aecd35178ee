"""``poisonscan demo``: the whole pipeline on the bundled CIFAR-10 subset (see docs/demo.md).

poison (bundled clean subset + HTBA trigger) -> threat model (bundled, made by our own ``pretrain``; or trained
with ``--pretrain``) -> backdoor strength -> detect -> detection quality against ground truth -> clean -> linear
probe ACC/ASR before and after cleaning.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from poisonscan.config import PoisonConfig
from poisonscan.runs import releases_run_locks

#: the bundled demo data, trigger and threat model (inside the installed package)
ASSETS = Path(str(resources.files("poisonscan").joinpath("assets")))
DEMO_TRAIN = ASSETS / "demo" / "train-000000.tar.gz"
DEMO_VAL = ASSETS / "demo" / "val-000000.tar.gz"
DEMO_TRIGGER = ASSETS / "triggers" / "trigger_10.png"
DEMO_MODEL = ASSETS / "demo" / "threat_model.safetensors"
DEMO_TARGET = "0"  # airplane

#: the attack planted by the demo (the cifar10 preset's setting on the bundled subset)
DEMO_ATTACK: dict[str, Any] = {"rate": 0.5, "trigger_size": 8.0, "margin": 0.25, "val_margin": 0.10, "seed": 0}

#: the recipe of the bundled threat model (poisonscan pretrain flags); tools/make_demo_assets.py uses it
DEMO_RECIPE: dict[str, Any] = {"method": "simclr", "arch": "resnet18", "image_size": 32, "epochs": 100,
                               "batch_size": 256, "temperature": 0.2, "seed": 0}


def poison_demo_data(dest: Path, train: Path | str = DEMO_TRAIN, val: Path | str = DEMO_VAL,
                     trigger: Path | str = DEMO_TRIGGER, target: str = DEMO_TARGET, overwrite: bool = False,
                     quiet: bool = True) -> dict[str, Any]:
    """Plant the demo's poisons; returns paths of the poisoned train set, patched val set and ground truth."""
    from poisonscan.attacks.poison import poison_dataset

    cfg = PoisonConfig(data=str(train), out=str(dest), targets=[f"{target}={trigger}"], val=str(val),
                       overwrite=overwrite, **DEMO_ATTACK)
    summary = poison_dataset(cfg, quiet=quiet)
    return {"summary": summary, "train": Path(dest) / "train", "val_patched": Path(dest) / "val_patched",
            "ground_truth": Path(dest) / "ground_truth.csv"}


def _bundled_model_matches(ground_truth: Path) -> bool:
    """Whether the bundled threat model was trained on exactly this poisoned data (hash of the ground truth)."""
    import hashlib
    import json

    record = DEMO_MODEL.with_suffix(".json")
    if not record.is_file():
        return False
    expected = json.loads(record.read_text(encoding="utf-8"))["data"]["ground_truth_sha256"]
    return hashlib.sha256(Path(ground_truth).read_bytes()).hexdigest() == expected


@releases_run_locks
def run_demo(cfg: "DemoConfig", quiet: bool = False) -> dict[str, Any]:
    """Run the whole pipeline and return the demo summary (also written as ``demo.json`` in the run folder, which
    is locked while this runs)."""
    import time

    from poisonscan.chain import ChainSpec, run_chain
    from poisonscan.errors import UsageError
    from poisonscan.runs import create_run

    run = create_run("demo", cfg.out, overwrite=True)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"[demo] {msg}", file=__import__("sys").stderr,
                                                               flush=True))
    timings: dict[str, float] = {}
    custom = cfg.data is not None
    if custom and not cfg.pretrain:
        raise UsageError("--data needs --pretrain (the bundled threat model was trained on the bundled data)")
    train = Path(cfg.data) if custom else DEMO_TRAIN
    val = Path(cfg.val) if cfg.val else (DEMO_VAL if not custom else None)
    if val is None:
        raise UsageError("--data needs --val (a labelled validation set for ACC/ASR)")
    trigger = Path(cfg.trigger) if cfg.trigger else DEMO_TRIGGER
    target = cfg.target or DEMO_TARGET

    t0 = time.perf_counter()
    if cfg.limit:
        train = _subset(train, cfg.limit, run.file("subset"))
    say(f"planting poisons: trigger {trigger.name} on {DEMO_ATTACK['rate']:.0%} of class {target}")
    poisoned = poison_demo_data(run.file("data"), train, val, trigger, target, overwrite=True)
    planted = int(poisoned["summary"]["train"]["poisoned"])
    timings["poison"] = time.perf_counter() - t0

    bundled = not cfg.pretrain and (cfg.limit or _bundled_model_matches(poisoned["ground_truth"]))
    if not cfg.pretrain and not bundled:
        raise UsageError("the bundled threat model does not match the planted data; run with --pretrain")
    recipe = dict(DEMO_RECIPE, epochs=cfg.epochs or DEMO_RECIPE["epochs"])
    if bundled:
        say("threat model: the bundled one, trained by `poisonscan pretrain` on this exact poisoned data")
    spec = ChainSpec(
        work=run.path, train=str(poisoned["train"]), val=str(val), trigger=str(trigger), target=target,
        trigger_size=DEMO_ATTACK["trigger_size"], truth=str(poisoned["ground_truth"]),
        val_patched=str(poisoned["val_patched"]), labelled_train=str(train),
        model=str(DEMO_MODEL) if bundled else None, recipe=recipe,
        detect={k: v for k, v in (("masks", cfg.masks), ("iterations", cfg.classifier_iters)) if v},
        strength_fraction=0.1, probe_fractions=(0.1,), retrain_epochs=cfg.retrain_epochs, seed=cfg.seed,
        device=cfg.device, precision=cfg.precision,
        names={"detect": "detect", "clean": "clean.tsv", "probe": "probe-before", "retrain": "retrain",
               "retrain_probe": "probe-after"},
        say=say)
    chain = run_chain(spec)
    model = Path(chain["model"])
    model_origin = "bundled (tools/make_demo_assets.py, docs/demo.md)" if bundled else "trained by this demo"
    strength = chain["strength"]
    scan = chain["detect"]["poisoncam"]
    detect, quality = scan["summary"], scan["quality"]
    cleaned = scan["cleaned"]
    before = chain["probes"].get(0.1)
    after = (scan.get("retrained") or {}).get("probes", {}).get(0.1)
    timings.update(chain["timings"])

    removal = quality["removal"]
    summary = {
        "command": "demo", "run_dir": str(run.path),
        "planted": planted, "n_samples": int(poisoned["summary"]["train"]["n"]),
        "threat_model": {"path": str(model), "origin": model_origin,
                         "knn_accuracy": strength.get("knn", {}).get("accuracy"),
                         "knn_asr": strength.get("knn", {}).get("asr"),
                         "knn_target_rate_clean": strength.get("knn", {}).get("target_rate_clean"),
                         "poison_cluster_purity": (strength.get("clusters") or {}).get("purity"),
                         "oracle_flips": strength.get("flips")},
        "evidence": detect.get("evidence"),
        "detection": {"removed": int(removal["removed"]), "poisons_found": int(removal["tp"]),
                      "clean_removed": int(removal["fp"]), "recall": removal["recall"],
                      "precision": removal["precision"],
                      "auroc_poison_score": quality["scores"]["poison_score"]["auroc"],
                      "top20_trigger_accuracy": quality["triggers"]["topk"].get("20", {}).get("accuracy")},
        "probe_before": _probe_brief(before),
        "probe_after": _probe_brief(after) if after else None,
        "retrained": bool(after),
        "kept": cleaned.get("kept"),
        "files": {"report": str(run.file("detect/report.html")), "gallery": str(run.file("detect/gallery")),
                  "manifest": str(run.file("clean.tsv")), "detect_summary": str(run.file("detect/summary.json"))},
        "timings": timings,
        "runtime": run.read_json("detect/environment.json").get("runtime"),     # device and autocast of detect
    }
    run.write_json("demo.json", summary)
    return summary


def _subset(train: Path, limit: int, dest: Path) -> Path:
    """An evenly spaced subset of ``limit`` training samples (every class kept), as new shards in ``dest``."""
    import numpy as np

    from poisonscan.data.writers import reshard
    from poisonscan.data.sources import open_source

    source = open_source(train)
    keep = np.linspace(0, len(source) - 1, num=min(limit, len(source))).round().astype(int).tolist()
    reshard(source, sorted(set(keep)), dest, shard_size=len(keep), compress=True, prefix="train")
    return dest


def _probe_brief(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    target = result["targets"][0] if result.get("targets") else {}
    return {"acc_clean": result.get("acc_clean"), "acc_patched": result.get("acc_patched"),
            "asr": target.get("asr"), "fp_rate_clean": target.get("fp_rate_clean")}
