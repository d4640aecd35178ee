"""Does a null of search-like windows keep the recurrence test from grouping a clean model's top-k windows?

    python -m benchmarks.studies.search_like_null RUN_DIR [RUN_DIR ...] [--json OUT]

The recurrence test compares the top-k windows with windows cut at uniform positions of random images. The top-k
are selected (the masking's attention picks each image's window, the search keeps the windows that flip most), so
on a clean-data model they can resemble each other more than uniform windows do: on CIFAR-10 50k 7 dark-edge windows
of the top 20 grouped at p 0.002. This study draws the null the way the search draws candidates: for the evidence
test's first 256 random images (the recorded ``null_sources``), the window cluster activation masking picks, with the
run's own model, clusters, masks and window. It prints, per finished detect run folder, the recorded test and the
test against that null (group size, bar, p-value). Reads the run folder's files directly (any poisonscan version).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonscan.detect.clustering import Clustering
from poisonscan.detect.seeds import derive_seed
from poisonscan.detect.features import prepare_encoder
from poisonscan.detect.masking import MaskingConfig, cluster_activation_masking, cut_windows, make_masks, window_pixels
from poisonscan.detect.recurrence import REFERENCE_SIZE, recurrence_test
from poisonscan.data.store import open_store
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runtime import setup_runtime


def _settings(run: Path) -> dict[str, Any]:
    """masks, window, mask strategy, seed and model of a run, from a flat (0.1) or sectioned config.json."""
    cfg = json.loads((run / "config.json").read_text())
    search = cfg.get("search") or cfg
    return {"masks": int(search["masks"]), "window": float(search["window"]),
            "strategy": search.get("mask_strategy", "full"), "seed": int(cfg.get("seed", 0)), "model": cfg["model"],
            "arch": cfg.get("arch"), "image_size": cfg.get("image_size")}


def search_like_windows(run: Path, encoder: Any, runtime: Any) -> torch.Tensor:
    """The windows the masking picks, with the run's model (``encoder``), clusters, masks and window, in the
    evidence test's first 256 random images (``null_sources``): uint8 n x 3 x w x w. The masks are the paper's
    (``masks`` random full-coverage masks) whatever the run's ``search.masking``."""
    s = _settings(run)
    size = int(encoder.image_size)
    store = open_store(run / "store")
    clustering = Clustering.load(run / "clusters.npz")
    ev = json.loads((run / "evidence.json").read_text())
    w = window_pixels(s["window"], size)
    src = np.asarray(ev["null_sources"][:REFERENCE_SIZE], dtype=np.int64)
    imgs = store.images[torch.as_tensor(src)]
    masks = make_masks(MaskingConfig(s["masks"], w, s["strategy"]), size,
                       torch.Generator().manual_seed(derive_seed(s["seed"], "masks")))
    _, boxes, _ = cluster_activation_masking(encoder, clustering, imgs, masks, runtime, window=w)
    return cut_windows(imgs, boxes)


def study(run: Path, runtime: Any) -> dict[str, Any]:
    s = _settings(run)
    encoder, _ = load_encoder(s["model"], arch=s["arch"], image_size=s["image_size"])
    encoder = prepare_encoder(encoder.eval(), runtime)
    store = open_store(run / "store")
    ev = json.loads((run / "evidence.json").read_text())
    search = json.loads((run / "search.json").read_text())
    boxes = {int(e["index"]): e["box"] for e in search["scored"]}
    top = [int(i) for i in ev["top_k"]]
    top_patches = cut_windows(store.images[torch.as_tensor(top)], torch.as_tensor([boxes[i] for i in top]))
    null_patches = search_like_windows(run, encoder, runtime)
    searched = recurrence_test(top_patches, null_patches, seed=s["seed"])
    recorded = ev.get("recurrence") or {}
    return {"run": str(run), "recorded": {k: recorded.get(k) for k in ("size", "bar", "p_value", "null_group_p99")},
            "search_like": {k: searched[k] for k in ("size", "bar", "p_value", "null_group_p99")},
            "n_null": int(len(null_patches))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runtime = setup_runtime("cpu", "auto")
    rows = []
    print(f"{'run':<48}{'recorded: size / bar / p':>30}{'search-like null: size / bar / p':>38}")
    for run in args.runs:
        r = study(run, runtime)
        rows.append(r)
        a, b = r["recorded"], r["search_like"]
        print(f"{run.parent.name + '/' + run.name:<48}{a['size']!s:>10} / {a['bar'] or 0:.3f} / {a['p_value'] or 0:.3f}"
              f"{b['size']:>18} / {b['bar']:.3f} / {b['p_value']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
