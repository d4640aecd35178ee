"""Retrain only the poison classifier of a finished detect run with other settings; print recall and precision.

The search, its top-k patches and the poison scores are read from the run folder, so one variant costs one
classifier training (tens of seconds on 2 CPU cores at 32 px). Ground truth: a ``poison`` ground_truth.csv, or, for
the bundled demo data, ids ending in ``__poison``.

    python -m benchmarks.studies.classifier_variants RUN '{"holdout": 0.05}' [--truth ground_truth.csv] [--threads 2]

Keys of the JSON variant: any ``ClassifierConfig`` field (``iterations``, ``ensemble``, ``crop_scale``,
``decoys``, ``min_iterations``, ...), ``drop_top`` and ``holdout`` (``classifier_split``), ``rounds``
and ``refine_by`` (``"p"`` or ``"removal"``: ``train_with_refinement``), ``neighbours`` (the removal score of
``detect/neighbours.py``) and ``split_seed`` (the seed of ``classifier_split``; 0). Defaults: detect's
(``'{"decoys": 0, "rounds": 1, "neighbours": 0, "ensemble": 1}'`` is the paper's recipe). Each threshold is
reported for the classifier's probability alone and for the removal score.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from poisonscan.data.store import open_store
from poisonscan.detect.run import DetectRun
from poisonscan.detect.classifier import ClassifierConfig, ClassifierSettings, classifier_split, train_with_refinement
from poisonscan.detect.decision import DecisionSettings
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.neighbours import nearest_neighbours, neighbour_mean, removal_score
from poisonscan.runtime import setup_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("variant", nargs="?", default="{}")
    ap.add_argument("--truth", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = json.loads(args.variant)
    store = open_store(args.run / "store")
    run = DetectRun.load(args.run)
    scores, boxes = np.full(len(store), np.nan), run.search.boxes
    for i, score in run.search.scores.items():
        scores[i] = score
    top = [int(i) for i in run.evidence.top_k]
    if args.truth:
        with open(args.truth, newline="") as fh:
            truth = {r["sample_id"] for r in csv.DictReader(fh) if r["poisoned"] == "1"}
        y = np.array([i in truth for i in store.ids])
    else:
        y = np.array([i.endswith("__poison") for i in store.ids])
    split = classifier_split(scores, top, variant.pop("drop_top", 0.1), seed=int(variant.pop("split_seed", 0)),
                             holdout=variant.pop("holdout", 0.0))
    patches = cut_windows(store.images[torch.as_tensor(top)], torch.as_tensor([boxes[i] for i in top]))
    runtime = setup_runtime("cpu", "fp32")
    t0 = time.perf_counter()
    rounds = int(variant.pop("rounds", ClassifierSettings.rounds))
    k = int(variant.pop("neighbours", DecisionSettings.neighbours))
    refine_by = variant.pop("refine_by", ClassifierSettings.refine_by)
    variant.setdefault("ensemble", ClassifierSettings.ensemble)
    centroids = np.load(args.run / "clusters.npz")["centroids"]
    nbrs = nearest_neighbours(np.load(args.run / "features.npy", mmap_mode="r"), k, centroids) if k else None
    refined = train_with_refinement(store.images, patches, split, ClassifierConfig(**variant), runtime, rounds,
                                    quiet=True, neighbours=nbrs if refine_by == "removal" else None)
    res, probs = refined.result, refined.probs
    print(f"variant {variant} rounds {rounds} refine_by {refine_by}: poisons among the training negatives "
          f"{int(y[split.train].sum())} of {len(split.train)}, left after refinement {int(y[refined.train].sum())}; "
          f"dropped by refinement {refined.dropped}; iterations {res.iterations} (best {res.best_iteration}); "
          f"{time.perf_counter() - t0:.0f} s")
    means = neighbour_mean(probs, nbrs) if k else None
    for name, score in (("P", probs), (f"removal score (k = {k})", removal_score(probs, means))):
        for threshold in (0.5, 0.9, 0.99):
            removed = score > threshold
            tp = int((removed & y).sum())
            print(f"  {name} > {threshold}: removed {int(removed.sum())}, recall {tp / max(1, y.sum()):.4f}, "
                  f"precision {tp / max(1, removed.sum()):.4f}")


if __name__ == "__main__":
    main()
