r"""Two settings on one finished detect run, each resumed from the same stage, side by side.

Both sides resume a copy of the run folder (hard links; every file is rewritten by replacement, so the original
stays as it was) from ``--from`` on, with the run's own settings and ``--a`` or ``--b`` on top; the earlier stages'
records are reused, so the two differ only by what those settings change from that stage on. Printed and recorded
for both: seconds and threat-model forwards by recomputed stage, whether the classifier trained (or why not), the
verdict, the removal (and the images one removes and the other keeps) and, with ``--truth``, recall and precision.
A run written by another poisonscan version is resumed as this version's (its ``config.json`` version replaced).

    python -m benchmarks.stage_ab --run RUN_DIR --work WORK_DIR --name demo --from match \
        --a classifier.train=always --b classifier.train=unless-matched \
        [--truth GROUND_TRUTH.csv] [--backdoor BACKDOOR_DIR/summary.json] \
        --out benchmarks/results/stages/demo-classifier.json
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from poisonscan import __version__
from poisonscan.config import DetectConfig, EvalDetectionConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.resume import STAGES
from poisonscan.detect.run import DetectRun
from poisonscan.eval.runner import run_detection
from poisonscan.runs import INVOCATION_SETTINGS, LOCK_NAME, atomic_write_json, environment_record
from poisonscan.runtime import setup_runtime
from poisonscan.settings import resolve_config
from benchmarks.fast_vs_exact import comparison_args, link_tree, threat_model_strength

DECISION_FILES = ("removed.txt", "scores.csv", "summary.json", "report.html")


def prepare(run: Path, dst: Path, first: str) -> dict[str, Any]:
    """A copy of ``run`` at ``dst`` (hard links) whose stages from ``first`` on are forgotten, as this version's
    run; returns its settings."""
    if first not in STAGES or first in STAGES[:3]:
        raise SystemExit(f"--from {first}: one of {', '.join(STAGES[3:])}")
    if dst.exists():
        shutil.rmtree(dst)
    link_tree(run, dst)
    for stage in STAGES[STAGES.index(first):]:
        (dst / "stages" / f"{stage}.done").unlink(missing_ok=True)
    for name in DECISION_FILES:
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / "gallery", ignore_errors=True)
    (dst / LOCK_NAME).unlink(missing_ok=True)
    saved = json.loads((run / "config.json").read_text())
    saved = {k: v for k, v in saved.items() if k != "version" and k not in INVOCATION_SETTINGS}
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps({"version": __version__, **saved}, indent=2))
    return saved


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (dotted setting names); values are parsed as JSON where they can be, else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: give KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def one_side(run: Path, dst: Path, first: str, sets: dict[str, Any]) -> dict[str, Any]:
    """Resume a copy of ``run`` from ``first`` with ``sets`` on top of its settings."""
    saved = prepare(run, dst, first)
    flags = {**sets, "resume": str(dst), "out": str(dst), "quiet": True}
    cfg = resolve_config(DetectConfig, None, flags, tables=[(str(dst / "config.json"), saved)])
    started = time.perf_counter()
    run_detect(cfg, setup_runtime(cfg.device, cfg.precision), quiet=True)
    return {"seconds": time.perf_counter() - started, "run": DetectRun.load(dst)}


def describe(res: dict[str, Any], first: str, truth: str | None, folder: Path) -> dict[str, Any]:
    s = res["run"].summary
    redone = STAGES[STAGES.index(first):]
    clf = s["classifier"]
    out = {"seconds": round(res["seconds"], 1),
           "stage_seconds": {k: round(v, 1) for k, v in s["timings"].items() if k in redone},
           "forwards": {k: v for k, v in s["cost"]["forwards"].items() if k in redone},
           "classifier_trained": bool(clf["trained"]), "classifier_skipped": clf.get("skipped"),
           "verdict": s["verdict"], "reason": s["evidence"]["reason"], "removed": s["counts"]["removed"]}
    if truth:
        q = run_detection(EvalDetectionConfig(run=str(folder), truth=truth))
        out.update(recall=q["removal"]["recall"], precision=q["removal"]["precision"])
    return out


def main() -> None:
    ap = comparison_args(__doc__, "a finished detect run folder", "where the two runs are written (a/, b/)")
    ap.add_argument("--from", dest="first", required=True, help="the first stage both sides recompute")
    ap.add_argument("--a", nargs="*", default=[], help="side a's settings, KEY=VALUE")
    ap.add_argument("--b", nargs="*", default=[], help="side b's settings, KEY=VALUE")
    args = ap.parse_args()
    sides = {"a": parse_sets(args.a), "b": parse_sets(args.b)}
    result = {}
    for side, sets in sides.items():
        folder = args.work / side
        result[side] = {"settings": sets,
                        **describe(one_side(args.run, folder, args.first, sets), args.first, args.truth, folder)}
    removed = {side: set(DetectRun.load(args.work / side).removed) for side in sides}
    diff = {"only_a": sorted(removed["a"] - removed["b"]), "only_b": sorted(removed["b"] - removed["a"])}
    record = {"name": args.name, "setting": args.setting, "run": str(args.run), "from_stage": args.first,
              "threat_model": threat_model_strength(args.backdoor), "a": result["a"], "b": result["b"],
              "removed_difference": diff,
              "environment": environment_record()}
    a, b = result["a"], result["b"]
    print(f"{args.name}: {args.setting} (both from the {args.first} stage)")
    print(f"{'':14}{'a':>12}{'b':>12}   a: {args.a}  b: {args.b}")
    for k in a["stage_seconds"]:
        print(f"{'s ' + k:14}{a['stage_seconds'][k]:>12}{b['stage_seconds'].get(k, 0):>12}")
    for k in a["forwards"]:
        if k != "total":
            print(f"{'fw ' + k:14}{a['forwards'][k]:>12,}{b['forwards'].get(k, 0):>12,}")
    for k in ("seconds", "classifier_trained", "removed", "recall", "precision"):
        if k in a:
            print(f"{k:14}{a[k]!s:>12.10}{b[k]!s:>12.10}")
    print(f"verdict a: {a['verdict']}; b: {b['verdict']}")
    print(f"removed only by a {len(diff['only_a'])}, only by b {len(diff['only_b'])}")
    if args.out:
        atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
