"""The opt-in verification of isolated flags (``detect --set decision.verify_min_prob=P``) on finished benchmark runs
(benchmarks/results/notebook.md section 5, "Verifying isolated flags").

    python -m benchmarks.studies.verify_runs WORK [WORK ...] [--min-prob 0.9] [--json OUT]

Each ``WORK`` is a ``run_pipeline.py`` work folder (``detect-poisoncam/`` and ``data/ground_truth.csv``). Its
detect run is copied to ``detect-verify-<min_prob>/`` (the original is left as it is) and resumed with the
verification on: only the ``verify`` and ``outputs`` stages run. Prints, per run, removed / recall / precision
before and after, how many images were flip-tested and how many of those removed were poisons and clean images, the
bar and the stage's time; ``--json`` writes the same rows with each run's environment record (machine, versions,
commit, seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from poisonscan.config import DetectConfig

from poisonscan.settings import resolve_config
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.resume import read_run_config
from poisonscan.eval.detection import evaluate_detection, read_run, read_truth


def verified_run(work: Path, min_prob: float) -> Path:
    """``work``'s detect run resumed with ``decision.verify_min_prob = min_prob`` in a copy (reused when finished)."""
    src, dst = work / "detect-poisoncam", work / f"detect-verify-{min_prob:g}"
    if not (dst / "stages" / "outputs.done").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        cfg = resolve_config(DetectConfig, None, {"resume": str(dst), "decision.verify_min_prob": min_prob,
                                                  "quiet": True}, tables=[("config.json", read_run_config(dst))])
        run_detect(cfg, quiet=True)
    return dst


def compare(work: Path, after: Path) -> dict[str, Any]:
    """Removal before (``detect-poisoncam``) and after (``after``) against the ground truth, and what the
    verification flip-tested."""
    truth = read_truth(work / "data" / "ground_truth.csv")
    before_m = evaluate_detection(read_run(work / "detect-poisoncam"), truth)["removal"]
    after_m = evaluate_detection(read_run(after), truth)["removal"]
    ver = json.loads((after / "verify.json").read_text())
    ids = json.loads((after / "ids.json").read_text())
    poisoned = {truth.ids[i] for i in range(len(truth.ids)) if truth.poisoned[i]}
    cand = [(ids[e["index"]] in poisoned, e) for e in ver["candidates"]]
    return {
        "work": str(work), "min_prob": ver["min_prob"], "bar": ver["bar"],
        "candidates": len(cand), "candidate_poisons": sum(p for p, _ in cand),
        "verified_poisons": sum(p and e["verified"] for p, e in cand),
        "verified_clean": sum((not p) and e["verified"] for p, e in cand),
        "poison_flips": sorted(e["poison_score"] for p, e in cand if p),
        "best_clean_flips": sorted((e["poison_score"] for p, e in cand if not p), reverse=True)[:5],
        "verify_seconds": json.loads((after / "stages" / "verify.done").read_text()).get("seconds"),
        "before": {k: before_m[k] for k in ("removed", "recall", "precision")},
        "after": {k: after_m[k] for k in ("removed", "recall", "precision")},
        "environment": json.loads((after / "environment.json").read_text()),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare` rows."""
    def rp(m: dict[str, Any]) -> str:
        return f"{m['removed']:,}, {100 * m['recall']:.2f}% / {100 * m['precision']:.2f}%"

    out = ["| run | flip-tested (poisons) | bar | removed by it: poisons / clean | before: removed, recall / "
           "precision | after | verify s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {Path(r['work']).name} | {r['candidates']} ({r['candidate_poisons']}) | {r['bar']} | "
                   f"{r['verified_poisons']} / {r['verified_clean']} | {rp(r['before'])} | {rp(r['after'])} | "
                   f"{r['verify_seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="+", type=Path)
    ap.add_argument("--min-prob", type=float, default=0.9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [compare(w, verified_run(w, args.min_prob)) for w in args.work]
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
