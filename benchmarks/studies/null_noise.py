"""How much the backdoor-evidence decision depends on which random windows the null drew (benchmarks/results/notebook.md s. 2c).

    python -m benchmarks.studies.null_noise RUN_DIR [RUN_DIR ...] [--pool 4096] [--sizes 256 1024] [--draws 200]
        [--truth RUN_DIR=DATA/ground_truth.csv ...] [--json OUT]

For each finished detect run folder: scores a large pool of random windows with the run's own model, clusters and
flip set (a hard-linked copy of the run, resumed with ``null_size = --pool``; the run itself is not touched), then
redoes the evidence test ``--draws`` times on subsets of ``--sizes`` windows drawn from that pool without
replacement, and reports the spread of the null median, of ``z`` and of the effect, and how often today's gate
(``--min-evidence``, ``--min-effect``: detect's ``decision.min_evidence`` and ``decision.min_effect``) says "backdoor
signal". With ``--truth`` it also counts the pool's windows cut from poisons.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.studies.null_sources import null_source_report, poisoned_ids

from poisonscan.config import DetectConfig
from benchmarks.studies.record_compat import upgrade_record

from poisonscan.detect.evidence import backdoor_evidence, evidence_gate
from poisonscan.detect.records import Evidence
from poisonscan.detect.decision import DecisionSettings
from poisonscan.detect.pipeline import run_detect
from poisonscan.detect.resume import read_run_config
from poisonscan.settings import resolve_config
from poisonscan.runs import atomic_write_json, environment_record

GATE = DecisionSettings()
NO_GATE = 1e9   # the copy's min_evidence: its gate stays shut, so the resume stops at the (skipped) classifier


def score_pool(run: Path, pool: int, scratch: Path, runtime: Any = None) -> dict[str, Any]:
    """The evidence record of a hard-linked copy of ``run`` resumed with ``pool`` null windows (only the evidence
    stage and the outputs rerun; the classifier is skipped)."""
    saved = read_run_config(run)
    copy = scratch / run.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, copy_function=_link_or_copy)    # every write of a resume is atomic: links stay intact
    saved.update(out=str(copy), fail_on=None)
    saved["evidence"]["null_size"] = int(pool)
    saved["decision"].update(min_evidence=NO_GATE, min_effect=GATE.min_effect, force=False)
    cfg = resolve_config(DetectConfig, None, {"resume": str(copy), "quiet": True}, tables=[("config.json", saved)])
    run_detect(cfg, runtime, quiet=True)
    return json.loads((copy / "evidence.json").read_text())


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:                 # another file system (the default scratch is the system's temp dir)
        shutil.copy2(src, dst)


def redraws(ev: dict[str, Any], sizes: list[int], draws: int, min_evidence: float, min_effect: float,
            seed: int = 0) -> dict[str, Any]:
    """The evidence test redone ``draws`` times per null size on windows drawn without replacement from the pooled
    null scores of ``ev``: spread of null median, z and effect, and the share of draws the gate passes."""
    null = np.asarray(ev["null_scores"], dtype=np.float64)
    topk = np.asarray(ev["topk_scores"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for size in sizes:
        if size > null.size:
            raise ValueError(f"null size {size} is larger than the pool ({null.size} windows)")
        rows = []
        for d in range(draws):
            sub = null[rng.choice(null.size, size, replace=False)]
            e = backdoor_evidence(topk, sub, int(ev["n_scored"]), int(ev["n_flip"]), seed=d)
            rows.append((e["null_median"], e["z"], e["effect"], evidence_gate(Evidence.from_json(e), min_evidence, min_effect)[0]))
        med, z, eff, found = (np.array(c, dtype=np.float64) for c in zip(*rows))
        out[str(size)] = {"null_median": _spread(med), "z": _spread(z), "effect": _spread(eff),
                          "found_share": float(found.mean()), "draws": draws}
    return out


def _spread(x: np.ndarray) -> dict[str, float]:
    q05, q50, q95 = np.quantile(x, [0.05, 0.5, 0.95])
    return {"mean": float(x.mean()), "std": float(x.std()), "q05": float(q05), "q50": float(q50), "q95": float(q95),
            "min": float(x.min()), "max": float(x.max())}


def study(run: Path, pool: int, sizes: list[int], draws: int, scratch: Path, truth: Path | None = None,
          runtime: Any = None, min_evidence: float = GATE.min_evidence,
          min_effect: float = GATE.min_effect) -> dict[str, Any]:
    """One run's row: its recorded evidence, the pooled evidence and the redraws per null size, each judged by the
    gate ``min_evidence`` / ``min_effect`` (today's defaults unless given)."""
    t0 = time.perf_counter()
    pooled = score_pool(run, pool, scratch, runtime)
    recorded = upgrade_record(json.loads((run / "evidence.json").read_text()))
    min_ev, min_eff = float(min_evidence), float(min_effect)
    row: dict[str, Any] = {
        "run": str(run), "pool": int(len(pooled["null_scores"])), "n_flip": int(pooled["n_flip"]),
        "n_scored": int(pooled["n_scored"]), "k": int(pooled["k"]), "topk_median": float(pooled["topk_median"]),
        "min_evidence": min_ev, "min_effect": min_eff,
        "recorded": {"null_size": recorded.get("null_size"), "null_median": recorded.get("null_median"),
                     "z": recorded.get("z"), "effect": recorded.get("effect"),
                     "found": evidence_gate(Evidence.from_json(recorded), min_ev, min_eff)[0]},
        "pooled": {k: pooled[k] for k in ("null_median", "z", "effect", "boot_std", "topk_spread")}
        | {"found": evidence_gate(Evidence.from_json(pooled), min_ev, min_eff)[0]},
        "sizes": redraws(pooled, sizes, draws, min_ev, min_eff),
    }
    if truth is not None:
        rep = null_source_report(scratch / run.name, poisoned_ids(truth), top=8)
        row["pool_from_poisons"] = rep["null_from_poisons"]
        row["best_pool_windows_poison"] = [b["poison"] for b in rep["best_null"]]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    """Per run: the recorded test, then per null size the median [5th, 95th percentile] of the null median, z and
    effect over the redraws and the share of redraws the gate passes, then the whole pool's test."""
    print(f"{'run':<44}{'null':>6}{'null median':>24}{'z':>24}{'effect':>22}{'found':>8}")
    for r in rows:
        rec = r["recorded"]
        print(f"{Path(r['run']).parent.name + '/' + Path(r['run']).name:<44}{rec['null_size'] or '-':>6}"
              f"{rec['null_median']:>24.1f}{rec['z']:>24.2f}{100 * rec['effect']:>21.1f}%"
              f"{'yes' if rec['found'] else 'no':>8}  (recorded)")
        for size, s in r["sizes"].items():
            print(f"{'':<44}{size:>6}{_range(s['null_median'], 1, 1):>24}{_range(s['z'], 1, 2):>24}"
                  f"{_range(s['effect'], 100, 1):>22}{100 * s['found_share']:>7.0f}%")
        p = r["pooled"]
        extra = f", {r['pool_from_poisons']} cut from poisons" if "pool_from_poisons" in r else ""
        print(f"{'':<44}{r['pool']:>6}{p['null_median']:>24.1f}{p['z']:>24.2f}{100 * p['effect']:>21.1f}%"
              f"{'yes' if p['found'] else 'no':>8}  (the whole pool{extra})")


def _range(s: dict[str, float], scale: float, digits: int) -> str:
    return f"{s['q50'] * scale:.{digits}f} [{s['q05'] * scale:.{digits}f}, {s['q95'] * scale:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--pool", type=int, default=4096, help="random windows scored per run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="null sizes to redraw")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--min-evidence", type=float, default=GATE.min_evidence)
    ap.add_argument("--min-effect", type=float, default=GATE.min_effect)
    ap.add_argument("--truth", action="append", default=[], metavar="RUN=CSV",
                    help="ground truth of a run (counts the pool's windows cut from poisons)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="where the copies go (default: a temp dir; on the runs' file system they are hard links)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args()
    truths = {Path(k).resolve(): Path(v) for k, v in (t.split("=", 1) for t in args.truth)}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        for run in args.runs:
            rows.append(study(run, args.pool, args.sizes, args.draws, Path(tmp), truths.get(run.resolve()),
                              min_evidence=args.min_evidence, min_effect=args.min_effect))
            print(f"[null-noise] {run}: {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "pool": args.pool, "sizes": args.sizes, "draws": args.draws,
                                      "min_evidence": args.min_evidence, "min_effect": args.min_effect,
                                      "environment": environment_record(0)})


if __name__ == "__main__":
    main()
