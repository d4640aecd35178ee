"""Pretraining throughput: poisonscan's trainer vs a bare bf16 + channels_last loop of the same model and batch.

Both sides run SimCLR (or MoCo v3) on timm resnet18 at 64 px with the same batched uint8 augmentation, SGD step and
batch, on synthetic uint8 images held in memory (decoding is not part of a training step). The trainer's figure is
its steady-state epoch (the first epoch is a warm-up); the bare loop is timed after warm-up steps. A ratio near 1
means the trainer adds no overhead. Also reported: the bare loop without augmentation (pre-made views).

    python benchmarks/bench_pretrain.py [--steps 6] [--batch-size 256] [--image-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from poisonscan.config import PretrainConfig
from poisonscan.data.transforms import SSLAugment
from poisonscan.models import create_encoder
from poisonscan.runs import RunDir
from poisonscan.runtime import setup_runtime
from poisonscan.ssl.methods import create_method
from poisonscan.ssl.trainer import Pretrainer, build_optimizer


def bare_loop(arch: str, method: str, size: int, batch: int, steps: int, warmup: int, augment: bool,
              device: torch.device, amp: torch.dtype | None) -> float:
    """Image pairs per second of the plainest loop: augment, forward under autocast, backward, SGD step."""
    torch.manual_seed(0)
    enc = create_encoder(arch, size)
    model = create_method(method, enc).to(device, memory_format=torch.channels_last)
    opt = build_optimizer(model, "sgd", 5e-4)
    for g in opt.param_groups:
        g["lr"] = 0.1
    aug = SSLAugment(size, mean=enc.mean, std=enc.std)
    u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    gen = torch.Generator().manual_seed(0)
    fixed = aug(u8, gen)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        views = aug(u8, gen) if augment else fixed
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def trainer_loop(arch: str, method: str, size: int, batch: int, steps: int, device: str,
                 precision: str) -> float:
    """Image pairs per second of ``Pretrainer`` over its second epoch of ``steps`` steps (the first warms up)."""
    runtime = setup_runtime(device, precision)
    images = torch.randint(0, 256, (batch * steps, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PretrainConfig(data="synthetic", arch=arch, method=method, image_size=size, epochs=2, batch_size=batch,
                             quiet=True, device=device, precision=precision, optimizer="sgd")
        trainer = Pretrainer(cfg, RunDir(tmp), runtime, images)
        trainer.fit()
        return float(trainer.history[-1]["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    rt = setup_runtime(args.device, args.precision)
    common = (args.arch, args.method, args.image_size, args.batch_size)
    bare = bare_loop(*common, args.steps, args.warmup, True, rt.device, rt.amp_dtype)
    bare_noaug = bare_loop(*common, args.steps, args.warmup, False, rt.device, rt.amp_dtype)
    ours = trainer_loop(*common, args.steps, args.device, args.precision)
    result = {
        "arch": args.arch, "method": args.method, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps": args.steps, "device": str(rt.device), "amp": str(rt.amp_dtype), "threads": torch.get_num_threads(),
        "bare_pairs_per_s": round(bare, 1), "bare_no_aug_pairs_per_s": round(bare_noaug, 1),
        "trainer_pairs_per_s": round(ours, 1), "trainer_vs_bare": round(ours / bare, 3),
        "augment_share": round(1 - bare / bare_noaug, 3),
    }
    print(f"{'loop':<32}{'image pairs/s':>14}")
    print(f"{'bare (no augmentation)':<32}{bare_noaug:>14.1f}")
    print(f"{'bare (+ batched augmentation)':<32}{bare:>14.1f}")
    print(f"{'poisonscan trainer':<32}{ours:>14.1f}")
    print(f"trainer / bare = {ours / bare:.3f}; augmentation takes {100 * result['augment_share']:.0f}% of a step "
          f"({args.arch}, {args.method}, {args.image_size} px, batch {args.batch_size}, {rt.device}, {rt.amp_dtype})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
