r"""The exact and the fast path of detect on the same run's store, features and clusters, side by side.

The exact path is the paper's procedure (``detect --exact``: all B masks on every searched image, every window and
every null window on the whole flip set, the classifier trained on every signal); the fast path is the defaults
(coarse-to-fine masking, an adaptive null, the classifier only where the picture match does not make the
removal). Both resume a copy of one finished run folder from its clusters (the store, features and clustering are
linked, not recomputed), so they differ only where the two paths differ. Printed and recorded for
both: threat-model forwards by stage, seconds by stage, the top-k (overlap), z, effect, the recurring group, the
verdict, the removal (and the images one removes and the other keeps) and, with ``--truth``, recall and precision.

    python benchmarks/fast_vs_exact.py --run RUN_DIR --work WORK_DIR --name demo \
        [--truth GROUND_TRUTH.csv] [--backdoor BACKDOOR_DIR/summary.json] \
        --out benchmarks/results/speed/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from poisonscan import __version__
from poisonscan.config import EXACT, DetectConfig, EvalDetectionConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.run import DetectRun
from poisonscan.eval.runner import run_detection
from poisonscan.runs import INVOCATION_SETTINGS, atomic_write_json, config_record, environment_record
from poisonscan.runtime import setup_runtime
from poisonscan.settings import dotted_names, resolve_config

REUSED = ("store", "features.npy", "ids.json", "clusters.npz", "errors.csv", "environment.json")
REUSED_STAGES = ("store", "features", "clusters")
#: flat setting names of run folders written with flat settings and their section names; settings dropped
OLD_NAMES = {"classifier_iters": "iterations", "classifier_holdout": "holdout", "classifier_decoys": "decoys",
             "classifier_rounds": "rounds", "classifier_refine_by": "refine_by",
             "classifier_positives": "positives"}
DROPPED = ("version",)


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` holds ``src``'s files as hard links (copies across file systems)."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            link_tree(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def comparison_args(doc: str | None, run_help: str, work_help: str) -> argparse.ArgumentParser:
    """The arguments of a script that detects one run folder two ways: the run, where the two go, a name, the
    ground truth and backdoor measurement, a one-line setting and the record's path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help=run_help)
    ap.add_argument("--work", type=Path, required=True, help=work_help)
    ap.add_argument("--name", required=True)
    ap.add_argument("--truth", default=None, help="ground_truth.csv of the poisoned data")
    ap.add_argument("--backdoor", default=None, help="summary.json of `poisonscan eval backdoor` on the threat model")
    ap.add_argument("--setting", default="", help="one line: data, poisons, trigger, threat model")
    ap.add_argument("--out", type=Path, default=None, help="JSON record")
    return ap


def threat_model_strength(backdoor: str | None) -> dict[str, Any] | None:
    """k-NN ASR and the clean rate from ``poisonscan eval backdoor``'s summary (``None`` without one)."""
    if not backdoor:
        return None
    knn = json.loads(Path(backdoor).read_text()).get("knn") or {}
    return {"knn_asr": knn.get("asr"), "clean_rate": knn.get("target_rate_clean")}


def prepare(run: Path, dst: Path) -> dict[str, Any]:
    """A fresh run folder at ``dst`` that holds ``run``'s store, features and clusters (done) and its settings."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "stages").mkdir(parents=True)
    for name in REUSED:
        if (run / name).exists():
            link_tree(run / name, dst / name)
    for stage in REUSED_STAGES:
        shutil.copy2(run / "stages" / f"{stage}.done", dst / "stages" / f"{stage}.done")
    saved = json.loads((run / "config.json").read_text())
    saved = {k: v for k, v in saved.items() if k != "version" and k not in INVOCATION_SETTINGS}
    if "search" not in saved:                    # a run of the flat settings: the same settings in their sections
        renamed = {OLD_NAMES.get(k, k): v for k, v in saved.items()}
        flat = dotted_names(DetectConfig, {k: v for k, v in renamed.items() if k not in DROPPED})
        saved = config_record(resolve_config(DetectConfig, None, flat))
    (dst / "config.json").write_text(json.dumps({"version": __version__, **saved}, indent=2))
    return saved


def one_path(run: Path, dst: Path, exact: bool, fast: dict[str, Any]) -> dict[str, Any]:
    """Resume a copy of ``run`` from its clusters with the exact path's settings or the fast path's."""
    saved = prepare(run, dst)
    flags = {**(EXACT if exact else fast), "resume": str(dst), "out": str(dst), "quiet": True}
    cfg = resolve_config(DetectConfig, None, flags, tables=[(str(dst / "config.json"), saved)])
    started = time.perf_counter()
    run_detect(cfg, setup_runtime(cfg.device, cfg.precision), quiet=True)
    return {"seconds": time.perf_counter() - started, "run": DetectRun.load(dst)}


def describe(res: dict[str, Any], truth: str | None, folder: Path) -> dict[str, Any]:
    r = res["run"]
    s, ev = r.summary, r.evidence
    rec = ev.recurrence
    out = {"seconds": round(res["seconds"], 1), "forwards": s["cost"]["forwards"],
           "stage_seconds": {k: round(v, 1) for k, v in s["timings"].items()},
           "n_scored": len(r.search.scored), "exact_scores": sum(r.search.is_exact(e) for e in r.search.scored),
           "top_k": list(ev.top_k), "z": ev.z, "effect": ev.effect, "null_median": ev.null_median,
           "recurrence": {"size": rec.size, "k": rec.k, "p_value": rec.p_value} if rec else None,
           "backdoor_found": s["evidence"]["backdoor_found"], "reason": s["evidence"]["reason"],
           "removed": s["counts"]["removed"]}
    if truth:
        q = run_detection(EvalDetectionConfig(run=str(folder), truth=truth))
        out.update(recall=q["removal"]["recall"], precision=q["removal"]["precision"],
                   top20_trigger_accuracy=q["triggers"]["topk"].get("20", {}).get("accuracy"))
    return out


def main() -> None:
    ap = comparison_args(__doc__, "a finished detect run folder (store, features, clusters)",
                         "where the two runs are written")
    args = ap.parse_args()
    fast = {key: getattr(getattr(DetectConfig(), key.split(".")[0]), key.split(".")[1]) for key in EXACT}
    paths = {}
    for name, exact in (("exact", True), ("fast", False)):
        folder = args.work / name
        paths[name] = describe(one_path(args.run, folder, exact, fast), args.truth, folder)
    ex, fa = paths["exact"], paths["fast"]
    removed = {n: set(DetectRun.load(args.work / n).removed) for n in paths}
    diff = {"only_exact": sorted(removed["exact"] - removed["fast"]),
            "only_fast": sorted(removed["fast"] - removed["exact"])}
    overlap = len(set(ex["top_k"]) & set(fa["top_k"]))
    record = {"name": args.name, "setting": args.setting, "run": str(args.run),
              "threat_model": threat_model_strength(args.backdoor), "exact": ex, "fast": fa, "top_k_overlap": overlap, "removed_difference": diff,
              "forwards_ratio": ex["forwards"]["total"] / max(1, fa["forwards"]["total"]),
              "environment": environment_record()}
    stages = [k for k in ex["forwards"] if k != "total" and (ex["forwards"][k] or fa["forwards"][k])]
    print(f"{args.name}: {args.setting}")
    print(f"{'':10}{'exact':>14}{'fast':>14}")
    for k in stages + ["total"]:
        print(f"{'fw ' + k:12}{ex['forwards'][k]:>12,}{fa['forwards'][k]:>14,}")
    for k in ("search", "evidence", "match", "classifier"):
        print(f"{'s ' + k:12}{ex['stage_seconds'].get(k, 0):>12}{fa['stage_seconds'].get(k, 0):>14}")
    print(f"{'seconds':12}{ex['seconds']:>12}{fa['seconds']:>14}")
    for k in ("z", "effect", "null_median", "removed", "backdoor_found", "recall", "precision", "exact_scores",
              "n_scored"):
        if k in ex:
            print(f"{k:12}{ex[k]!s:>12.10}{fa[k]!s:>14.10}")
    print(f"top-k overlap {overlap}/{len(ex['top_k'])}; removed only by exact {len(diff['only_exact'])}, only by "
          f"fast {len(diff['only_fast'])}; forwards {record['forwards_ratio']:.2f}x fewer")
    if args.out:
        atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
