"""Backdoor evidence on strong, weak and no-poison settings of the demo data; chooses decision.min_evidence.

    python -m benchmarks.studies.evidence_study --weak .bench/models/demo_epoch37.safetensors [--work .bench/evidence]

Cases (all on the bundled CIFAR-10 subset, 32 px, detect at paper defaults with the capped cluster count):
  strong   bundled threat model (100 epochs) on the poisoned demo data
  weak     an earlier, weaker snapshot of the same training run (``--weak``) on the same poisoned data
  clean    bundled threat model on the bundled data with NO poison planted (a hygiene scan of clean data)
Prints a table and writes results.json with evidence, removed counts, detection quality and threat-model strength.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from poisonscan.config import DetectConfig, EvalBackdoorConfig, EvalDetectionConfig
from poisonscan.settings import configure
from poisonscan.demo import DEMO_ATTACK, DEMO_MODEL, DEMO_TARGET, DEMO_TRAIN, DEMO_TRIGGER, DEMO_VAL, poison_demo_data
from poisonscan.detect.pipeline import run_detect
from poisonscan.eval.runner import run_backdoor, run_detection
from poisonscan.runs import atomic_write_json, environment_record


def case(name: str, data: Path, model: Path, truth: Path | None, work: Path, force: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = work / f"detect-{name}"
    det = run_detect(configure(DetectConfig, data=str(data), model=str(model), out=str(out), force=force,
                               quiet=True, resume=str(out) if out.exists() else None), quiet=True)
    row: dict[str, Any] = {"case": name, "model": str(model), "evidence": det["evidence"],
                           "removed": det["counts"]["removed"], "seconds": round(time.perf_counter() - t0, 1)}
    if truth is not None:
        q = run_detection(EvalDetectionConfig(run=str(out), truth=str(truth)))
        row.update(recall=q["removal"]["recall"], precision=q["removal"]["precision"],
                   auroc=q["scores"]["poison_score"]["auroc"],
                   top20=q["triggers"]["topk"].get("20", {}).get("accuracy"))
        s = run_backdoor(EvalBackdoorConfig(model=str(model), data=str(DEMO_VAL), trigger=str(DEMO_TRIGGER),
                                            target=DEMO_TARGET, train=str(data), truth=str(truth),
                                            trigger_size=DEMO_ATTACK["trigger_size"], out=str(work / f"bd-{name}"),
                                            quiet=True)) or {}
        row["strength"] = {"knn_acc": s["knn"]["accuracy"], "knn_asr": s["knn"]["asr"],
                           "knn_target_rate_clean": s["knn"]["target_rate_clean"],
                           "purity": (s.get("clusters") or {}).get("purity"),
                           "oracle_flips": (s.get("flips") or {}).get("changed_share")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weak", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(".bench/evidence"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    poisoned = poison_demo_data(args.work / "data", overwrite=True)
    rows = [case("strong", poisoned["train"], DEMO_MODEL, poisoned["ground_truth"], args.work, force=True),
            case("weak", poisoned["train"], args.weak, poisoned["ground_truth"], args.work, force=True),
            case("clean", DEMO_TRAIN, DEMO_MODEL, None, args.work, force=True)]
    atomic_write_json(args.work / "results.json", {"rows": rows, "environment": environment_record(0)})
    print(f"{'case':<8}{'z':>7}{'p':>9}{'best':>7}{'removed':>9}{'recall':>8}{'prec':>7}{'AUROC':>7}{'top20':>7}")
    for r in rows:
        e = r["evidence"]
        print(f"{r['case']:<8}{e['z']:>7.2f}{e['p_value']:>9.4f}{e['best_flip_share']:>7.2f}{r['removed']:>9}"
              f"{r.get('recall', float('nan')):>8.3f}{r.get('precision', float('nan')):>7.3f}"
              f"{r.get('auroc', float('nan')):>7.3f}{(r.get('top20') or float('nan')):>7.2f}")
        if "strength" in r:
            print("         strength:", r["strength"])


if __name__ == "__main__":
    main()
