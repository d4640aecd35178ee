"""How should PoisonCAM mask? Localisation of the trigger on a finished scan's poisons, by masking mode.

    python -m benchmarks.studies.vit_masking RUN_DIR --model M.safetensors --truth DATA/ground_truth.csv \
        --out benchmarks/results/vit/masking-localisation.json

For each poison of the run's store (its ``store``, ``ids.json`` and ``clusters.npz``), with the run's threat model:
the candidate window of coarse-to-fine pixel zeroing (the CNN default: ``w`` px windows, 73 masks), of dropping the
covered tokens at every token position (``search.vit_masking = "drop-tokens"``) and of zeroing the pixels of the same
token-aligned windows. A CNN threat model (no tokens to drop) compares coarse-to-fine pixel zeroing with the paper's
B = 256 full-coverage masks (``search.masking = "exact"``). Prints and records each mode's mean IoU with the trigger
box, its catch rate (the window covers at least half of the trigger) and its seconds on this machine, at
``--precision`` (``auto``: bf16 on a CPU with bf16 units, else fp32).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonscan import runtime as rt
from poisonscan.data.store import open_store
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.masking import (EVERY_POSITION, CoarseToFine, MaskingConfig, cluster_activation_masking,
                                       coarse_to_fine_masking, grid_corners, make_masks, token_window, window_masks,
                                       window_pixels)
from poisonscan.settings import PAPER
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runs import atomic_write_json, environment_record


def localisation(boxes: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean IoU of ``boxes`` with the ``truth`` boxes (n x 4, x y w h), and the share covering half the trigger."""
    x0, y0 = np.maximum(boxes[:, 0], truth[:, 0]), np.maximum(boxes[:, 1], truth[:, 1])
    x1 = np.minimum(boxes[:, 0] + boxes[:, 2], truth[:, 0] + truth[:, 2])
    y1 = np.minimum(boxes[:, 1] + boxes[:, 3], truth[:, 1] + truth[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = truth[:, 2] * truth[:, 3]
    iou = inter / (boxes[:, 2] * boxes[:, 3] + area - inter)
    cover = inter / area
    return {"iou": round(float(iou.mean()), 3), "catch": round(float((cover >= 0.5).mean()), 3),
            "any_overlap": round(float((cover > 0).mean()), 3)}


def rt_precision(runtime: rt.Runtime) -> str:
    """The autocast dtype the study ran at: ``bfloat16``, ``float16`` or ``fp32``."""
    return str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--precision", default="auto", help="auto (bf16 where this CPU has it, else fp32), bf16 or fp32")
    args = ap.parse_args()
    store = open_store(args.run / "store")
    ids = json.loads((args.run / "ids.json").read_text())
    enc, _ = load_encoder(args.model)
    runtime = rt.setup_runtime("cpu", args.precision)
    clustering = Clustering.load(args.run / "clusters.npz")
    size = int(store.images.shape[-1])
    w = window_pixels(None, size)
    with open(args.truth, newline="") as fh:
        gt = {r["sample_id"]: r for r in csv.DictReader(fh)}
    poisons = [i for i, s in enumerate(ids) if gt.get(s, {}).get("poisoned") == "1" and gt[s].get("x")]
    images = store.images[torch.as_tensor(poisons)]
    truth = np.array([[int(gt[ids[i]][k]) for k in "xywh"] for i in poisons])
    patch = int(enc.patch_size) if getattr(enc, "drops_tokens", False) else 0
    modes = masking_modes(enc, clustering, images, w, patch, runtime)
    rows = []
    for name, masks, run in modes:
        t0 = time.perf_counter()
        _, boxes, _ = run()
        row = {"masking": name, "masks_per_image": masks, **localisation(boxes.numpy(), truth),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name:<60} {masks:>3} masks  IoU {row['iou']:.3f}  catch {row['catch']:.3f}  "
              f"any {row['any_overlap']:.3f}  {row['seconds']:.1f} s", flush=True)
    atomic_write_json(args.out, {"run": str(args.run), "model": args.model, "image_size": size, "patch": patch or None,
                                 "precision": rt_precision(runtime),
                                 "window_px": w, "poisons": len(poisons), "trigger_side": int(truth[0, 2]),
                                 "rows": rows, "environment": environment_record()})


def masking_modes(enc: Any, clustering: Clustering, images: torch.Tensor, w: int, patch: int,
                  runtime: rt.Runtime) -> list[tuple[str, int, Any]]:
    """``(name, masks per image, run)`` of each masking compared: a ViT's (``patch`` > 0) three, a CNN's two."""
    size = int(images.shape[-1])
    gen = torch.Generator
    coarse = (f"zero pixels, coarse-to-fine ({w} px)", CoarseToFine().masks_per_image(w, size),
              lambda: coarse_to_fine_masking(enc, clustering, images, w, runtime, gen().manual_seed(0)))
    if not patch:
        masks = make_masks(MaskingConfig(PAPER.n_masks, w, "full"), size, gen().manual_seed(0))
        return [coarse, (f"zero pixels, the paper's B full-coverage masks ({w} px)", PAPER.n_masks,
                         lambda: cluster_activation_masking(enc, clustering, images, masks, runtime, window=w))]
    wt = token_window(w, patch, size // patch)
    return [
        coarse,
        (f"drop tokens, every position ({wt} x {wt} tokens = {wt * patch} px)", (size // patch) ** 2,
         lambda: coarse_to_fine_masking(enc, clustering, images, wt * patch, runtime, gen().manual_seed(0),
                                        plan=EVERY_POSITION, patch=patch)),
        (f"zero pixels, every token-aligned position ({wt * patch} px)", (size // patch) ** 2,
         lambda: cluster_activation_masking(enc, clustering, images,
                                            window_masks(grid_corners(size, patch), wt * patch, size), runtime,
                                            window=wt * patch)),
    ]


if __name__ == "__main__":
    main()
