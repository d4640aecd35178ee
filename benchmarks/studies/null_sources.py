"""Where a detect run's null windows came from, against the ground truth (benchmarks/results/notebook.md s. 2b).

    python -m benchmarks.studies.null_sources RUN_DIR --truth DATA/ground_truth.csv [--top 8] [--json]

Redraws the source image of each of the run's ``null_size`` random windows (the same seeded draw ``detect`` made,
from the pool its ``evidence.json`` names), and prints the best-scoring ones with their source and whether it is a
poison, how many null windows were cut from poisons, and how many poisons lie inside the clusters the null left out
(the top-k's). A null drawn from every image is contaminated when the best random windows are cut from poisons.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.studies.record_compat import replay_null_sources

from poisonscan.detect.seeds import derive_seed


def poisoned_ids(truth: Path) -> set[str]:
    """Sample ids marked ``poisoned`` in a ``poison`` ground-truth CSV."""
    with open(truth, newline="") as fh:
        return {r["sample_id"] for r in csv.DictReader(fh) if r.get("poisoned") == "1"}


def null_source_report(run: Path, poisons: set[str], top: int = 8) -> dict[str, Any]:
    """The null windows' sources of the detect run folder ``run`` and their poison status."""
    ev = json.loads((run / "evidence.json").read_text())
    ids = json.loads((run / "ids.json").read_text())
    labels = np.load(run / "clusters.npz")["labels"]
    seed = int(json.loads((run / "config.json").read_text()).get("seed", 0))
    null = np.asarray(ev["null_scores"])
    src = (np.asarray(ev["null_sources"]) if "null_sources" in ev else          # recorded since detect lists them
           replay_null_sources(derive_seed(seed, "null"), len(ids), len(null), labels, ev["top_k"],
                               ev.get("null_pool", "all")))
    is_poison = np.array([ids[i] in poisons for i in src])
    excluded = np.isin(labels, labels[np.asarray(ev["top_k"], dtype=np.int64)])
    all_poison = np.array([i in poisons for i in ids])
    order = np.argsort(-null, kind="stable")[:top]
    return {
        "run": str(run), "null_pool": ev.get("null_pool", "all"), "null_size": int(len(null)),
        "null_from_poisons": int(is_poison.sum()),
        "poisons": int(all_poison.sum()),
        "poisons_in_topk_clusters": int((all_poison & excluded).sum()),
        "topk_clusters_share": float(excluded.mean()),
        "topk_median": float(np.median(ev["topk_scores"])),
        "best_null": [{"score": int(null[o]), "id": ids[src[o]], "poison": bool(is_poison[o]),
                       "cluster": int(labels[src[o]])} for o in order],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--truth", type=Path, required=True)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rep = null_source_report(args.run, poisoned_ids(args.truth), args.top)
    if args.json:
        print(json.dumps(rep, indent=1))
        return
    print(f"{rep['run']}: null from {rep['null_pool']}, {rep['null_from_poisons']} of {rep['null_size']} windows "
          f"cut from poisons; {rep['poisons_in_topk_clusters']} of {rep['poisons']} poisons lie in the top-k's "
          f"clusters ({100 * rep['topk_clusters_share']:.1f}% of the images); top-k median {rep['topk_median']:g}")
    for b in rep["best_null"]:
        print(f"  {b['score']:>5}  {'POISON' if b['poison'] else 'clean ':<6}  cluster {b['cluster']:>4}  {b['id']}")


if __name__ == "__main__":
    main()
