r"""The evidence gate on finished detect runs: the run's decision beside the effect bar's alone.

For each run it prints and records the poisonscan release whose detect made the decision (``version``, from the
run's ``summary.json``), the threat model's strength (k-NN ASR against the rate at which clean images
are already put with the target), ``z``, the effect, the recurrence test (the largest group of top-k windows
showing one picture against the largest groups of random windows), what the run decided, what the effect bar
alone (``decision.min_effect = 0.15`` with ``z >= 3``, ``decision.max_recurrence_p = 0``) would have decided on the
same evidence, and the removal's recall and precision (and how many of the top 20 are poisons) where the ground truth is given.

    python benchmarks/decision_records.py --out benchmarks/results/decisions/demo.json \
        --run demo RUN_DIR --truth GROUND_TRUTH.csv --backdoor BACKDOOR_DIR/summary.json --setting "..." \
        --role tuned --command "poisonscan demo ..."

The records are what docs/results.md is generated from (``benchmarks/results_page.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from poisonscan.config import EvalDetectionConfig
from poisonscan.detect.evidence import evidence_gate
from poisonscan.detect.matching import holds_picture
from poisonscan.detect.run import DetectRun
from poisonscan.eval.runner import run_detection
from poisonscan.runs import atomic_write_json, environment_record

EFFECT_BAR = 0.15       # the effect bar compared against (``--set decision.min_effect=0.15``)


def _strength(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    knn = json.loads(Path(path).read_text()).get("knn") or {}
    return {"knn_asr": knn.get("asr"), "clean_rate": knn.get("target_rate_clean"), "knn_accuracy": knn.get("accuracy")}


def _picture_match(pm: dict[str, Any] | None) -> dict[str, Any] | None:
    """The picture match's figures in ``summary.json`` (``None``: the picture was not searched for)."""
    if not pm:
        return None
    return {k: pm.get(k) for k in ("threshold", "bar", "outlier_bar", "templates", "contain", "beyond_group")}


def row(name: str, run: Path, truth: str | None, backdoor: str | None, setting: str, role: str = "held-out",
        commands: list[str] | None = None) -> dict[str, Any]:
    """One run's record."""
    detect = DetectRun.load(run)
    summary, ev = detect.summary, detect.evidence
    rec = ev.recurrence.to_json() if ev.recurrence is not None else {}
    feat = ev.feature_recurrence.to_json() if ev.feature_recurrence is not None else None
    changed = ev.changed_recurrence.to_json() if ev.changed_recurrence is not None else None
    held = ev.held_recurrence.to_json() if ev.held_recurrence is not None else None
    keys = ("signature", "size", "k", "p_value", "null_group_median", "null_group_p99", "bar", "n_reference")
    by_effect, effect_reason = evidence_gate(ev, 3.0, EFFECT_BAR, max_recurrence_p=0.0)
    out: dict[str, Any] = {
        "name": name, "setting": setting, "role": role, "commands": list(commands or []), "run": str(run),
        "version": summary.get("version"),
        "threat_model": _strength(backdoor),
        "z": ev.z, "effect": ev.effect,
        "recurrence": {k: rec.get(k) for k in keys},
        "changed_recurrence": {k: changed.get(k) for k in keys} if changed is not None else None,
        "held_recurrence": ({k: held.get(k) for k in (*keys, "holders", "gap")} if held is not None else None),
        "held_response": ev.held_response.to_json() if ev.held_response is not None else None,
        "feature_recurrence": {k: feat.get(k) for k in keys} if feat is not None else None,
        "decision": {"backdoor_found": summary["evidence"]["backdoor_found"], "reason": summary["evidence"]["reason"],
                     "removed": summary["counts"]["removed"], "scanned": summary["counts"]["scanned"]},
        "effect_bar": {"backdoor_found": by_effect, "reason": effect_reason},
        "picture_match": _picture_match(summary.get("picture_match")),
    }
    if truth:
        q = run_detection(EvalDetectionConfig(run=str(run), truth=truth))
        out["decision"].update(recall=q["removal"]["recall"], precision=q["removal"]["precision"],
                               top20_trigger_accuracy=q["triggers"]["topk"].get("20", {}).get("accuracy"))
        ids = detect.scores.ids
        with open(truth, newline="") as fh:
            poisoned = {r["sample_id"] for r in csv.DictReader(fh) if r.get("poisoned") == "1"}
        out["recurrence"].update(poisons_in_group=sum(ids[int(i)] in poisoned for i in rec.get("members", [])),
                                 poisons_in_top_k=sum(ids[int(i)] in poisoned for i in ev.top_k))
        for key, group in (("changed_recurrence", changed), ("held_recurrence", held), ("feature_recurrence", feat)):
            if group is not None:
                out[key]["poisons_in_group"] = sum(ids[int(i)] in poisoned for i in group["members"])
        holds = holds_picture(detect.match) if detect.match is not None else None
        if out["picture_match"] is not None and holds is not None:
            out["picture_match"]["poisons_holding"] = int(sum(ids[int(i)] in poisoned for i in np.flatnonzero(holds)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=2, metavar=("NAME", "DIR"), required=True)
    ap.add_argument("--truth", default=None, help="ground_truth.csv of the poisoned data")
    ap.add_argument("--backdoor", default=None, help="summary.json of `poisonscan eval backdoor` on the threat model")
    ap.add_argument("--setting", default="", help="one line: data, poisons, trigger, threat model")
    ap.add_argument("--role", choices=("tuned", "held-out"), required=True,
                    help="tuned: a default was chosen on this setting; held-out: none was")
    ap.add_argument("--command", action="append", default=[], help="a command that reproduces the run (repeat)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    r = row(args.run[0], Path(args.run[1]), args.truth, args.backdoor, args.setting, args.role, args.command)
    r["environment"] = environment_record()
    atomic_write_json(args.out, r)
    tm, rc, d = r["threat_model"] or {}, r["recurrence"], r["decision"]
    print(f"{r['name']}: k-NN ASR {tm.get('knn_asr')} (clean rate {tm.get('clean_rate')}); z {r['z']:.2f}, "
          f"effect {100 * (r['effect'] or 0):.1f}%; recurrence {rc['size']}/{rc['k']} (random: median "
          f"{rc['null_group_median']}, p99 {rc['null_group_p99']}), p = {rc['p_value']}"
          + (f"; poisons: {rc['poisons_in_top_k']} in the top-k, {rc['poisons_in_group']} in the group"
             if "poisons_in_group" in rc else ""))
    print(f"  the run's gate: {'found' if d['backdoor_found'] else 'not found'}, removed {d['removed']} of "
          f"{d['scanned']}" + (f", recall {d['recall']:.4f}, precision {d['precision']:.4f}" if "recall" in d else ""))
    print(f"  effect bar {EFFECT_BAR:g}: {'found' if r['effect_bar']['backdoor_found'] else 'not found'} "
          f"({r['effect_bar']['reason']})")


if __name__ == "__main__":
    main()
