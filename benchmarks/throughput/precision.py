"""Autocast precision on this machine: images/s of an encoder in fp32, bf16 and fp16, training and inference.

    python benchmarks/bench.py precision [--arch resnet18] [--size 64] [--batch-size 128] [--reps 3] [--json F]

Why it exists: on CPUs without native bf16 (no AVX-512 BF16 or AMX: AVX2-only laptops and many cloud cores) bf16
autocast is emulated and many times slower than fp32, which is why ``--precision auto`` picks fp32 there
(``poisonscan.runtime.cpu_has_native_bf16``). The script prints what ``auto`` picks and the measured speed of each
choice, so the claim can be checked on any machine. Random weights and data (speed only); each measurement is the
best of ``--reps`` timed repetitions after one warm-up step. Training = forward, a scalar loss, backward and an SGD
step; inference = a forward under ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from poisonscan.models.encoders import create_encoder
from poisonscan.runtime import setup_runtime, synchronize

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def images_per_second(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, train: bool,
                      reps: int) -> float:
    """Best images/s over ``reps`` timed steps (after one warm-up step) of training or inference under autocast."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    best = 0.0
    for rep in range(reps + 1):
        synchronize(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if train:
                model.train()
                model(x).float().pow(2).mean().backward()
            else:
                model.eval()
                with torch.inference_mode():
                    model(x)
        if train:
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize(x.device)
        if rep:                                                                     # rep 0 is the warm-up
            best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rt = setup_runtime(args.device, "auto")
    torch.manual_seed(0)
    model = create_encoder(args.arch, args.size).to(rt.device, memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=rt.device)
    x = x.contiguous(memory_format=torch.channels_last)
    env = rt.describe()
    auto = next(name for name, dtype in DTYPES.items() if dtype == rt.amp_dtype)     # in the table's names
    row: dict = {"device": env["device"], "cpu_capability": env["cpu_capability"],
                 "cpu_native_bf16": env["cpu_native_bf16"], "auto_picks": auto, "arch": args.arch, "size": args.size,
                 "batch_size": args.batch_size, "torch": torch.__version__, "threads": env["torch_threads"],
                 "images_per_s": {}}
    for name in args.precisions:
        row["images_per_s"][name] = {mode: round(images_per_second(model, x, DTYPES[name], mode == "train",
                                                                   args.reps), 1) for mode in ("train", "infer")}
    print(f"{row['device']} ({row['cpu_capability']}, native bf16: {row['cpu_native_bf16']}), {args.arch} at "
          f"{args.size} px, batch {args.batch_size}; --precision auto picks {auto}")
    print("| precision | training images/s | inference images/s |")
    print("|---|---|---|")
    for name, v in row["images_per_s"].items():
        print(f"| {name} | {v['train']} | {v['infer']} |")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
