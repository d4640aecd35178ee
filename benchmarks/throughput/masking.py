"""Throughput of the PoisonCAM hot loops against bare batched inference of the same model and batch size.

    python benchmarks/bench.py masking [--arch resnet18] [--size 64] [--batch-size 256] [--device auto]

Measures, with random weights (speed only):
- bare inference: ``encoder(x)`` on a ready normalised channels_last batch (images/s);
- cluster activation masking: n images x B masks through ``cluster_activation_masking`` (masked forwards/s),
  including batch assembly, masking, nearest-centroid assignment and the attention maps;
- poison scores: candidates x flip images through ``poison_scores`` (patched forwards/s).
Repetitions are interleaved (bare, masking, scoring, bare, ...) so load from other processes hits all alike; the
best repetition of each is reported and the masking/bare ratio is checked against the 0.85 target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from poisonscan.detect.clustering import Clustering
from poisonscan.detect.features import eval_mode, normalise_u8, prepare_encoder
from poisonscan.detect.masking import MaskingConfig, cluster_activation_masking, make_masks, window_pixels
from poisonscan.detect.fliptest import poison_scores
from poisonscan.runtime import Runtime, setup_runtime, synchronize


def build_encoder(arch: str, size: int) -> nn.Module:
    """poisonscan's encoder factory when present, else a bare timm backbone with ImageNet statistics."""
    try:
        from poisonscan.models.encoders import create_encoder

        return create_encoder(arch, size)
    except ImportError:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0)
        model.mean, model.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return model


def time_bare(encoder: nn.Module, images: torch.Tensor, rt: Runtime, batch_size: int, n_forwards: int) -> float:
    """Images/s of ``encoder`` on ready normalised batches (the same number of forwards as the masking run)."""
    x = normalise_u8(images[:1].to(rt.device), encoder.mean, encoder.std)
    x = x.expand(batch_size, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    n_batches = max(1, n_forwards // batch_size)
    with eval_mode(encoder), torch.inference_mode():
        synchronize(rt.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with rt.autocast():
                encoder(x)
        synchronize(rt.device)
    return n_batches * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=4, help="images masked per repetition")
    ap.add_argument("--masks", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--flip", type=int, default=128, help="flip-set images per candidate")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    rt = setup_runtime(args.device, args.precision)
    torch.manual_seed(0)
    enc = prepare_encoder(build_encoder(args.arch, args.size), rt)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    flips = torch.randint(0, 256, (args.flip, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    dim = int(getattr(enc, "feature_dim", 512))
    cent = torch.nn.functional.normalize(torch.randn(args.clusters, dim, generator=g), dim=1).numpy()
    clustering = Clustering(cent.astype(np.float32), np.zeros(1, np.int64), np.zeros(1, np.float32))
    window = window_pixels(None, args.size)
    masks = make_masks(MaskingConfig(n_masks=args.masks, window=window), args.size, g)
    patches = torch.randint(0, 256, (args.candidates, 3, window, window), generator=g, dtype=torch.uint8)
    flip_labels = torch.zeros(args.flip, dtype=torch.int64)
    n_mask_fwd = args.images * args.masks
    n_score_fwd = args.candidates * args.flip

    def run_masking() -> float:
        synchronize(rt.device)
        t0 = time.perf_counter()
        cluster_activation_masking(enc, clustering, images, masks, rt, batch_size=args.batch_size, window=window)
        synchronize(rt.device)
        return n_mask_fwd / (time.perf_counter() - t0)

    def run_scores() -> float:
        synchronize(rt.device)
        t0 = time.perf_counter()
        poison_scores(enc, clustering, flips, flip_labels, patches, rt, generator=0, batch_size=args.batch_size)
        synchronize(rt.device)
        return n_score_fwd / (time.perf_counter() - t0)

    # warm-up (allocator, cudnn autotune, oneDNN primitive caches)
    time_bare(enc, images, rt, args.batch_size, args.batch_size)
    cluster_activation_masking(enc, clustering, images[:1], masks[: max(1, args.batch_size // 4)], rt,
                               batch_size=args.batch_size, window=window)
    bare, masked, scored = [], [], []
    for _ in range(args.repeats):
        bare.append(time_bare(enc, images, rt, args.batch_size, n_mask_fwd))
        masked.append(run_masking())
        scored.append(run_scores())

    result = {
        "arch": args.arch, "image_size": args.size, "batch_size": args.batch_size, "device": str(rt.device),
        "amp_dtype": str(rt.amp_dtype), "torch_threads": torch.get_num_threads(), "masks": args.masks,
        "window": window, "clusters": args.clusters, "images": args.images, "flip": args.flip,
        "candidates": args.candidates, "repeats": args.repeats,
        "bare_images_per_s": max(bare), "masking_forwards_per_s": max(masked), "scoring_forwards_per_s": max(scored),
        "bare_median": statistics.median(bare), "masking_median": statistics.median(masked),
        "scoring_median": statistics.median(scored),
    }
    result["masking_ratio"] = result["masking_forwards_per_s"] / result["bare_images_per_s"]
    result["scoring_ratio"] = result["scoring_forwards_per_s"] / result["bare_images_per_s"]
    result["target_ratio"] = 0.85
    result["masking_ok"] = result["masking_ratio"] >= 0.85

    print(f"{args.arch} @ {args.size}px, batch {args.batch_size}, {rt.device} {rt.amp_dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'':28s}{'per s (best)':>14s}{'per s (median)':>16s}{'vs bare':>9s}")
    print(f"{'bare inference (images)':28s}{max(bare):14.1f}{statistics.median(bare):16.1f}{1.0:9.2f}")
    print(f"{'masking (masked forwards)':28s}{max(masked):14.1f}{statistics.median(masked):16.1f}"
          f"{result['masking_ratio']:9.2f}")
    print(f"{'poison scores (forwards)':28s}{max(scored):14.1f}{statistics.median(scored):16.1f}"
          f"{result['scoring_ratio']:9.2f}")
    print(f"masking/bare = {result['masking_ratio']:.2f} (target >= 0.85): "
          f"{'OK' if result['masking_ok'] else 'BELOW TARGET'}")
    if args.json:
        from poisonscan.runs import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
