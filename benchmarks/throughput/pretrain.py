"""Pretraining throughput: poisonscan's trainer vs a bare bf16 + channels_last loop of the same model and batch.

Both sides run SimCLR (or MoCo v3) on timm resnet18 at 64 px with the same batched uint8 augmentation, SGD step and
batch, on synthetic uint8 images held in memory (decoding is not part of a training step). The trainer's figure is
one epoch of ``--steps`` steps (the first epoch is a warm-up); the loops are interleaved over ``--rounds`` rounds and
each one's best round is reported, which keeps the comparison fair on a shared, noisy machine. A ratio near 1 means
the trainer adds no overhead. Also reported: the bare loop without augmentation (pre-made views).

    python benchmarks/bench.py pretrain [--steps 5] [--rounds 3] [--batch-size 256] [--image-size 64] [--json out.json]
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


class BareLoop:
    """The plainest loop: (augment,) forward under autocast, backward, SGD step - no logging, no schedule."""

    def __init__(self, arch: str, method: str, size: int, batch: int, device: torch.device,
                 amp: torch.dtype | None) -> None:
        torch.manual_seed(0)
        enc = create_encoder(arch, size)
        self.model = create_method(method, enc).to(device, memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, "sgd", 5e-4)
        for g in self.opt.param_groups:
            g["lr"] = 0.1
        self.aug = SSLAugment(size, mean=enc.mean, std=enc.std)
        self.u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        self.gen = torch.Generator().manual_seed(0)
        self.fixed = self.aug(self.u8, self.gen)
        self.device, self.amp, self.batch = device, amp, batch

    def run(self, steps: int, augment: bool) -> float:
        """Image pairs per second over ``steps`` steps."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            views = self.aug(self.u8, self.gen) if augment else self.fixed
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss = self.model(views)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self._sync()
        return steps * self.batch / (time.perf_counter() - t0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_trainer(arch: str, method: str, size: int, batch: int, steps: int, epochs: int, device: str,
                 precision: str, tmp: str) -> Pretrainer:
    """A ``Pretrainer`` on ``batch * steps`` synthetic uint8 images (one epoch = ``steps`` steps)."""
    runtime = setup_runtime(device, precision)
    images = torch.randint(0, 256, (batch * steps, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cfg = PretrainConfig(data="synthetic", arch=arch, method=method, image_size=size, epochs=epochs, batch_size=batch,
                         quiet=True, device=device, precision=precision, optimizer="sgd")
    return Pretrainer(cfg, RunDir(tmp), runtime, images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round of each loop counts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    rt = setup_runtime(args.device, args.precision)
    bare = BareLoop(args.arch, args.method, args.image_size, args.batch_size, rt.device, rt.amp_dtype)
    runs: dict[str, list[float]] = {"bare_no_aug": [], "bare": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args.arch, args.method, args.image_size, args.batch_size, args.steps,
                               args.rounds + 1, args.device, args.precision, tmp)
        bare.run(2, True)                    # warm-up (allocator, oneDNN kernels)
        trainer.fit(stop_after_epoch=1)
        # interleave the loops so that load from other processes hits all of them alike; keep each one's best round
        for r in range(args.rounds):
            runs["bare_no_aug"].append(bare.run(args.steps, False))
            runs["bare"].append(bare.run(args.steps, True))
            trainer.fit(stop_after_epoch=r + 2)
            runs["trainer"].append(float(trainer.history[-1]["images_per_s"]))
    best = {k: max(v) for k, v in runs.items()}
    result = {
        "arch": args.arch, "method": args.method, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps": args.steps, "rounds": args.rounds, "device": str(rt.device), "amp": str(rt.amp_dtype),
        "threads": torch.get_num_threads(),
        "pairs_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "bare_pairs_per_s": round(best["bare"], 1), "bare_no_aug_pairs_per_s": round(best["bare_no_aug"], 1),
        "trainer_pairs_per_s": round(best["trainer"], 1), "trainer_vs_bare": round(best["trainer"] / best["bare"], 3),
        "augment_share": round(1 - best["bare"] / best["bare_no_aug"], 3),
    }
    print(f"{'loop (best of ' + str(args.rounds) + ' rounds)':<34}{'image pairs/s':>14}   rounds")
    for key, label in (("bare_no_aug", "bare (no augmentation)"), ("bare", "bare (+ batched augmentation)"),
                       ("trainer", "poisonscan trainer")):
        print(f"{label:<34}{best[key]:>14.1f}   {', '.join(f'{x:.0f}' for x in runs[key])}")
    print(f"trainer / bare = {result['trainer_vs_bare']:.3f}; augmentation takes {100 * result['augment_share']:.0f}% "
          f"of a step ({args.arch}, {args.method}, {args.image_size} px, batch {args.batch_size}, {rt.device}, "
          f"{rt.amp_dtype}, {torch.get_num_threads()} threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
