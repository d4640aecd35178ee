"""Do the top-k windows keep their poison scores on flip-set images they were not selected on?

    python -m benchmarks.studies.replication RUN_DIR [RUN_DIR ...] [--truth CSV ...] [--json OUT]

The search keeps the windows that moved its flip set most, out of about 2,000 candidates, so part of a top-k
window's score is luck (which flip-set images, which paste positions), and a clean model's top-k stands above random
windows by that luck too. This study tests each finished run's top-k windows again on a *fresh* flip set: the
second-nearest image to every cluster centre (disjoint from the run's flip set, which holds the nearest), with
fresh paste positions, and beside them a sample of the search's other candidates (windows picked the same way,
not selected by their score) and uniform random windows. A trigger's copies move the fresh set as they moved the
old one; a window that was lucky falls back to where the other candidates are. Prints, per window, the recorded
and the fresh score (and whether it is a poison when ``--truth`` gives the ground truth, in the order of the runs).
Reads the run folder's files directly; costs (k + others + null) x flip-set forwards per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonscan.data.store import open_store
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.evidence import null_windows
from poisonscan.detect.features import prepare_encoder
from poisonscan.detect.fliptest import FlipTest, flip_test_set
from poisonscan.detect.masking import cut_windows
from poisonscan.eval.detection import read_truth
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runtime import setup_runtime
from poisonscan.runs import environment_record


def fresh_flip_set(clustering: Clustering, features: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """A second flip test set beside the run's (``taken``: as many images per cluster, the nearest to each cluster
    centre): the next-nearest as many (:func:`~poisonscan.detect.fliptest.flip_test_set` at twice the size,
    less ``taken``)."""
    n = len(np.unique(clustering.labels[taken]))
    return np.setdiff1d(flip_test_set(clustering, features, 2 * len(taken), n), taken)


def _poisoned(truth: Path | None, ids: list[str]) -> np.ndarray | None:
    if truth is None:
        return None
    gt = read_truth(truth)
    flag = dict(zip(gt.ids, gt.poisoned.tolist()))
    return np.array([flag.get(i, False) for i in ids])


def study(run: Path, runtime: Any, truth: Path | None, others: int, n_null: int, seed: int = 0) -> dict[str, Any]:
    cfg = json.loads((run / "config.json").read_text())
    search = json.loads((run / "search.json").read_text())
    ev = json.loads((run / "evidence.json").read_text())
    encoder, _ = load_encoder(cfg["model"], arch=cfg.get("arch"), image_size=cfg.get("image_size"))
    encoder = prepare_encoder(encoder.eval(), runtime)
    store = open_store(run / "store")
    clustering = Clustering.load(run / "clusters.npz")
    old = np.asarray(search["flip_set"], dtype=np.int64)
    fresh = fresh_flip_set(clustering, np.load(run / "features.npy", mmap_mode="r"), old)
    rule = search.get("rule") or cfg["search"]["score_rule"]
    flip = FlipTest.of(encoder, clustering, store.images, fresh, runtime, seed, rule, int(cfg.get("batch_size", 256)))
    scored = {int(e["index"]): e for e in search["scored"]}
    top = [int(i) for i in ev["top_k"]]
    rng = np.random.default_rng(seed)
    rest = np.array(sorted(set(scored) - set(top)), dtype=np.int64)
    other = rng.choice(rest, min(others, len(rest)), replace=False) if len(rest) else rest
    picked = np.concatenate([np.asarray(top, np.int64), other])
    boxes = torch.as_tensor([scored[int(i)]["box"] for i in picked], dtype=torch.int64)
    patches = cut_windows(store.images[torch.as_tensor(picked)], boxes)
    labels = clustering.labels
    got = flip.scores(patches, labels[picked], "replicate")
    w = int(patches.shape[-1])
    src = torch.as_tensor(rng.choice(len(store.images), n_null, replace=True))
    null = null_windows(store.images, n_null, w, torch.Generator().manual_seed(seed), sources=src)
    null_scores = flip.scores(null, labels[src.numpy()], "replicate null")
    ids = json.loads((run / "ids.json").read_text())
    poison = _poisoned(truth, ids)
    k = len(top)
    by_truth: dict[str, Any] = {}
    if poison is not None:
        flags = [bool(poison[i]) for i in top]
        for name, want in (("poison", True), ("clean", False)):
            vals = [int(got[j]) for j in range(k) if flags[j] == want]
            by_truth[f"{name}_fresh_median"] = float(np.median(vals)) if vals else None
        by_truth["poisons_in_top_k"] = int(sum(flags))
    rows = [{"index": int(i), "id": ids[int(i)], "top_k": j < k, "recorded": int(scored[int(i)]["poison_score"]),
             "fresh": int(got[j]), "poison": None if poison is None else bool(poison[int(i)])}
            for j, i in enumerate(picked)]
    return {"run": str(run), "rule": rule, "flip_set": len(old), "fresh_flip_set": len(fresh), "windows": rows,
            "null_fresh": null_scores.tolist(),
            "summary": {"top_k_recorded_median": float(np.median([r["recorded"] for r in rows[:k]])),
                        "top_k_fresh_median": float(np.median(got[:k])),
                        "others_recorded_median": float(np.median([r["recorded"] for r in rows[k:]])) if len(other)
                        else None,
                        "others_fresh_median": float(np.median(got[k:])) if len(other) else None,
                        "null_fresh_median": float(np.median(null_scores)),
                        "null_fresh_p99": float(np.quantile(null_scores, 0.99)), **by_truth}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--truth", nargs="*", type=Path, default=[])
    ap.add_argument("--others", type=int, default=40)
    ap.add_argument("--null", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runtime = setup_runtime("cpu", "auto")
    out = []
    for n, run in enumerate(args.runs):
        r = study(run, runtime, args.truth[n] if n < len(args.truth) else None, args.others, args.null)
        out.append(r)
        s = r["summary"]
        print(f"{run}: top-k recorded {s['top_k_recorded_median']:g} -> fresh {s['top_k_fresh_median']:g}; "
              f"other candidates {s['others_recorded_median']} -> {s['others_fresh_median']}; "
              f"random windows (fresh) median {s['null_fresh_median']:g}, p99 {s['null_fresh_p99']:g}", flush=True)
        for w in r["windows"][:20]:
            tag = "" if w["poison"] is None else ("poison" if w["poison"] else "clean")
            print(f"  {w['recorded']:>4} -> {w['fresh']:>4}  {tag}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"study": "benchmarks/studies/replication.py",
                                         "environment": environment_record(0), "runs": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
