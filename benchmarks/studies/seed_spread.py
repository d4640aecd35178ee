"""Mean and spread over seeds of every recorded ``run_pipeline.py`` configuration (benchmarks/results/notebook.md s. 3d).

    python -m benchmarks.studies.seed_spread [--results benchmarks/results] [--json] [RESULTS_JSON ...]

Reads the ``run_pipeline.py`` records (``results.json`` copies: a ``config``, ``seed``, ``targets`` and
``detection``) under ``--results`` plus any given, groups them by setting (preset, epochs, rate, trigger/target
pairs, clean control or not) and prints, per seed, the threat model's strength (k-NN ASR, oracle flips) beside what
PoisonCAM removed, its recall and precision, and the retrained model's k-NN ASR where the run retrained (against
the original labelled data where the run measured it there: a cleaned bank without the target class says 0 by
construction, and such a figure is left out), and the 10%-label linear probe's ASR of the run's own model and of
its retrained one (the target "within 1 point of a model trained on clean data" compares the latter with a clean
control's own probe); then the mean and sample standard deviation of each over the seeds.
One run recorded twice (a resumed ``--retrain`` record beside the first, or the run rebuilt in the same work
directory) counts once, with the figures of its newer record where both are alike; a retrained figure is taken from
the other record only when both record the same scan (the same number removed): a retraining on another scan's
cleaned set says nothing about this one. A record's detection figures are
those of the ``eval detection`` JSON beside it (``<name>-eval-detection.json``, or
``<name>-<tag>-eval-detection.json`` of a resumed scan whose ``<name>-<tag>.json`` is not itself a record) where
there is one: the scan as it stands, not as first run. A record without one whose
evidence today's gate (``DecisionSettings.min_evidence``, ``min_effect``; ``evidence_table.py``) would not pass counts
as 0 removed, marked ``gate``: what its scan resumed would remove. Nothing is rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.studies.evidence_table import table as evidence_rows

from poisonscan.detect.decision import DecisionSettings

SOURCE_RANK = {"eval-detection": 0, "record": 1, "gate": 2}
METRICS = ("knn_asr", "oracle_flips", "removed", "recall", "precision", "retrained_knn_asr", "probe_asr",
           "retrained_probe_asr")
RETRAINED = tuple(m for m in METRICS if m.startswith("retrained_"))    # taken only from the same scan's record
PROBE_FRACTION = "0.1"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_record(data: dict[str, Any] | None) -> bool:
    return bool(data) and all(k in data for k in ("config", "seed", "targets", "detection"))


def _eval_beside(path: Path) -> dict[str, Any] | None:
    """The ``eval detection`` JSON of the scan a record describes (see the module docstring)."""
    own = path.with_name(f"{path.stem}-eval-detection.json")
    if own.exists():
        return _load(own)
    for other in sorted(path.parent.glob(f"{path.stem}-*-eval-detection.json")):
        tag = other.name[len(path.stem) + 1:-len("-eval-detection.json")]
        if tag and not _is_record(_load(path.with_name(f"{path.stem}-{tag}.json"))):
            return _load(other)
    return None


def _retrained_asr(retrained: dict[str, Any]) -> float | None:
    """The retrained model's k-NN ASR: against the original labelled data when the run measured it there.

    A bank with (almost) no image of the target class (rate 1.0 cleaned away the whole class) gives 0 by
    construction: ``bank_target_count`` under ``k``, or, in records older than that field, a target rate of exactly
    0 on clean images. Such a row is left out (``None``) rather than read as an erased backdoor.
    """
    original = retrained.get("knn_original_bank") or {}
    if original.get("asr") is not None:
        return original["asr"]
    knn = retrained.get("knn") or {}
    if knn.get("asr") is None:
        return None
    count = knn.get("bank_target_count")
    no_target = count < knn.get("k", 0) if count is not None else knn.get("target_rate_clean") == 0.0
    return None if no_target else knn["asr"]


def _probe_asr(probes: dict[str, Any], fraction: str = PROBE_FRACTION) -> float | None:
    """The ASR of the probe trained with ``fraction`` of the labels: keyed ``<model>@<fraction>`` in a record's own
    ``probe`` (``no_defence@0.1``, ``clean_data@0.1``), plain ``<fraction>`` under ``retrained``."""
    for key, probe in probes.items():
        if key.rsplit("@", 1)[-1] == fraction and isinstance(probe, dict):
            return probe.get("asr")
    return None


def _row(path: Path, rec: dict[str, Any], method: str) -> dict[str, Any]:
    tm = rec.get("threat_model") or {}
    det = (rec.get("detection") or {}).get(method) or {}
    ev = _eval_beside(path) if not rec.get("clean_control") else None
    removal = (ev or {}).get("removal") or {}
    retrained = det.get("retrained") or {}
    flips = tm.get("flips") or {}
    row = {"record": str(path), "seed": rec["seed"],
           "knn_asr": (tm.get("knn") or {}).get("asr"),
           "oracle_flips": flips.get("changed_share"),
           "removed": removal.get("removed", det.get("removed")),
           "recall": removal.get("recall", det.get("recall")),
           "precision": removal.get("precision", det.get("precision")),
           "retrained_knn_asr": _retrained_asr(retrained),
           "probe_asr": _probe_asr(rec.get("probe") or {}),
           "retrained_probe_asr": _probe_asr(retrained.get("probe") or {}),
           "scan_removed": det.get("removed"),
           "source": "eval-detection" if ev else "record",
           "time": (rec.get("environment") or {}).get("time") or ""}
    if not ev and row["removed"]:
        gate = [r for r in evidence_rows([path], DecisionSettings.min_evidence, DecisionSettings.min_effect)
                if r["run"] == f"{path}:{method}"]
        if gate and not gate[0]["found_now"]:
            row.update(removed=0, recall=0.0 if row["recall"] is not None else None, precision=None, source="gate")
    return row


def _setting(rec: dict[str, Any]) -> str:
    pairs = ", ".join(f"{Path(t.split('=', 1)[1]).stem} -> {t.split('=', 1)[0]}" for t in rec["targets"])
    kind = "clean control" if rec.get("clean_control") else f"rate {rec.get('rate')}"
    return f"{rec['config']}, {rec['epochs']} epochs, {kind}, {pairs}"


def spread(paths: list[Path], method: str = "poisoncam") -> list[dict[str, Any]]:
    """One entry per setting: its seeds' rows and each metric's mean and sample std (``None`` under two values)."""
    groups: dict[str, dict[Any, dict[str, Any]]] = {}
    for path in paths:
        rec = _load(path)
        if not _is_record(rec) or method not in rec["detection"]:
            continue
        row = _row(path, rec, method)
        runs = groups.setdefault(_setting(rec), {})
        key = rec.get("model") or (rec["seed"], str(path))       # one run's records share its threat model
        if key in runs:     # one run: the scan as it stands (the newer of two alike) first, then fill the gaps
            newest = sorted((runs[key], row), key=lambda r: r["time"], reverse=True)
            first, other = sorted(newest, key=lambda r: SOURCE_RANK[r["source"]])
            runs[key] = {k: first[k] if first[k] is not None else other[k] for k in first}
            if first["scan_removed"] != other["scan_removed"]:     # another scan's retraining is not this one's
                for m in RETRAINED:
                    runs[key][m] = first[m]
            continue
        runs[key] = row
    out = []
    for setting, runs in sorted(groups.items()):
        rows = sorted(runs.values(), key=lambda r: (r["seed"], r["record"]))
        stats = {}
        for m in METRICS:
            vals = [float(r[m]) for r in rows if r[m] is not None]
            stats[m] = {"n": len(vals), "mean": statistics.fmean(vals) if vals else None,
                        "std": statistics.stdev(vals) if len(vals) > 1 else None}
        out.append({"setting": setting, "method": method, "seeds": rows, "stats": stats})
    return out


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if metric == "removed" else f"{100 * value:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--method", default="poisoncam")
    ap.add_argument("--json", action="store_true", help="print the groups as JSON")
    args = ap.parse_args()
    groups = spread(sorted(args.results.rglob("*.json")) + list(args.paths), args.method)
    if args.json:
        print(json.dumps(groups, indent=1))
        return
    heads = ("k-NN ASR", "flips", "removed", "recall", "precision", "retrained ASR", "probe ASR", "retr. probe")
    for g in groups:
        print(f"\n{g['setting']} ({g['method']})")
        print(f"{'seed':<16}" + "".join(f"{h:>14}" for h in heads))
        for r in g["seeds"]:
            mark = " (gate)" if r["source"] == "gate" else ""
            print(f"{str(r['seed']) + mark:<16}" + "".join(f"{_fmt(r[m], m):>14}" for m in METRICS))
        if len(g["seeds"]) > 1:
            s = g["stats"]
            print(f"{'mean':<16}" + "".join(f"{_fmt(s[m]['mean'], m):>14}" for m in METRICS))
            print(f"{'sample std':<16}" + "".join(f"{_fmt(s[m]['std'], m):>14}" for m in METRICS))


if __name__ == "__main__":
    main()
