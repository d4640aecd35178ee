"""The evidence test of every recorded detect run, and what today's gate decides for each (benchmarks/results/notebook.md s. 2).

    python -m benchmarks.studies.evidence_table [--results benchmarks/results] [--min-evidence 3] [--min-effect 0.15]
        [RUN_DIR_OR_JSON ...]

Reads the ``evidence`` record of each detect summary (and of the ``detection`` rows of ``run_pipeline.py`` results)
under ``--results`` plus any run folders or JSON files given, takes the flip-set size from the record (``n_flip``,
``clusters.flip_set``, or the best top-k score over ``best_flip_share``), and prints ``z``, ``effect`` (of the flip-set images
the null's top-k leave in place, the share the top-k move) and the gate's decision. A run recorded under several files
(a summary copied into a results JSON) is listed once; ``*`` marks a flip-set size taken from a demo record's
oracle test. ``null`` says where the null's windows came from (``all`` images, the default, or ``out``side the
top-k's clusters). ``z`` is today's (``scale`` ``min``: the gap over the smaller of the top-k's spread and the
bootstrap's) wherever the record keeps its top-k scores and bootstrap std (raw ``evidence.json`` records); ``std``
marks a summary that keeps the bootstrap-scaled ``z`` it recorded (``c68``, ``top``: two intermediate scales of
benchmarks/results/notebook.md s. 2b, in summaries written while they were tried). Nothing is rerun: this reads what the runs
measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

from poisonscan.detect.decision import DecisionSettings
from benchmarks.studies.record_compat import upgrade_record

from poisonscan.detect.evidence import Z_SCALE, effect_of, evidence_gate
from poisonscan.detect.records import Evidence


def _flip_size(ev: dict[str, Any], record: dict[str, Any]) -> tuple[int | None, str]:
    """The flip-set size and where it came from (``*``: the demo's oracle test, one image per cluster like the
    detect flip set at the capped cluster count, for demo records written before they carried it)."""
    if ev.get("n_flip"):
        return int(ev["n_flip"]), ""
    if (record.get("clusters") or {}).get("flip_set"):
        return int(record["clusters"]["flip_set"]), ""
    scores = [int(t["poison_score"]) for t in record.get("top_k") or [] if "poison_score" in t]
    if scores and ev.get("best_flip_share"):
        return round(max(scores) / float(ev["best_flip_share"])), ""
    oracle = ((record.get("threat_model") or {}).get("oracle_flips") or {}).get("flip_set")
    if record.get("command") == "demo" and oracle:
        return int(oracle), "*"
    return None, ""


def records(path: Path) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, evidence, record)`` of each detect run in a run folder or a JSON file."""
    if path.is_dir():
        ev_file, summary = path / "evidence.json", path / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            ev = {**(s.get("evidence") or {}), **(json.loads(ev_file.read_text()) if ev_file.exists() else {})}
            yield str(path), upgrade_record(ev), s
        return
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return
    if isinstance(data.get("evidence"), dict) and "z" in data["evidence"]:
        yield str(path), upgrade_record(data["evidence"]), data
    for method, row in (data.get("detection") or {}).items():
        if isinstance(row, dict) and isinstance(row.get("evidence"), dict):
            yield f"{path}:{method}", upgrade_record(row["evidence"]), row


SCALE_NAMES = {"min-spread": "min", "central68": "c68", "topk-spread": "top", "std": "std"}


#: the effect bar a record without the recurrence test is judged by: the gate it was decided with
RECORDED_EFFECT_BAR = 0.15


def table(paths: list[Path], min_evidence: float, min_effect: float,
          max_recurrence_p: float = DecisionSettings.max_recurrence_p,
          recorded_min_effect: float = RECORDED_EFFECT_BAR) -> list[dict[str, Any]]:
    """One row per recorded run. A record with the recurrence test is judged by today's gate (``min_evidence``,
    ``max_recurrence_p``, ``min_effect``); one without it cannot be, and is judged by ``z`` and the effect bar it was
    decided with (``recorded_min_effect``, or ``min_effect`` when larger)."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in paths:
        for name, ev, record in records(path):
            n_flip, mark = _flip_size(ev, record)
            if n_flip is None or "topk_median" not in ev:
                continue
            # one run, recorded several times: the same top-k, null and flip set (a rescaled raw record wins)
            key = (ev.get("null_pool", "all"), float(ev["topk_median"]), float(ev["null_median"]), n_flip,
                   round(float(ev.get("p_value", -1.0)), 6))
            full = {**ev, "n_flip": n_flip}             # effect_of recomputes the effect from these fields
            if ev.get("recurrence"):
                found, reason = evidence_gate(Evidence.from_json(full), min_evidence, min_effect, max_recurrence_p)
            else:
                found, reason = evidence_gate(Evidence.from_json(full), min_evidence, max(min_effect, recorded_min_effect))
            row = {"run": name + mark, "z": float(ev["z"]), "topk_median": float(ev["topk_median"]),
                   "null_median": float(ev["null_median"]), "n_flip": n_flip,
                   "effect": effect_of(Evidence.from_json(full)), "null_pool": ev.get("null_pool", "all"),
                   "z_scale": ev.get("z_scale", "std"),
                   "found_then": ev.get("backdoor_found"), "found_now": found, "reason": reason}
            if key in rows and rows[key]["z_scale"] == row["z_scale"] and abs(rows[key]["z"] - row["z"]) > 1e-6:
                key = key + (round(row["z"], 6),)       # same numbers, same scale, another z: another run
            if key in rows:
                kept = rows[key]
                if kept["z_scale"] != Z_SCALE and row["z_scale"] == Z_SCALE:     # today's z wins
                    row["found_then"] = kept["found_then"] if row["found_then"] is None else row["found_then"]
                    rows[key] = row
                elif kept["found_then"] is None:
                    kept["found_then"] = row["found_then"]
                continue
            rows[key] = row
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--min-evidence", type=float, default=DecisionSettings.min_evidence)
    ap.add_argument("--min-effect", type=float, default=DecisionSettings.min_effect)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    paths = sorted(args.results.rglob("*.json")) + list(args.paths)
    rows = table(paths, args.min_evidence, args.min_effect)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'run':<70}{'null':>5}{'scale':>6}{'z':>7}{'top-k':>7}{'null':>7}{'flip':>6}{'effect':>8}  recorded  gate")
    for r in sorted(rows, key=lambda r: r["effect"]):
        then = "-" if r["found_then"] is None else "yes" if r["found_then"] else "no"
        pool = "out" if r["null_pool"] == "outside-topk-clusters" else r["null_pool"]
        scale = SCALE_NAMES.get(r["z_scale"], r["z_scale"])[:5]
        print(f"{r['run'][-70:]:<70}{pool:>5}{scale:>6}{r['z']:>7.2f}{r['topk_median']:>7.1f}{r['null_median']:>7.1f}"
              f"{r['n_flip']:>6}{100 * r['effect']:>7.1f}%  {then:<8}  {'yes' if r['found_now'] else 'no'}")


if __name__ == "__main__":
    main()
