"""Device, precision, seeds, progress and torch.distributed helpers.

Every stage runs the same code for one process and under ``torchrun``: the world size decides (nanoGPT style).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from poisonscan.errors import UsageError

#: how long a rank waits in a collective: rank 0 alone clusters, tests the evidence and writes the outputs while the
#: others wait (torch's default is 10 minutes for NCCL)
DIST_TIMEOUT = timedelta(hours=2)
#: the group object collectives use: gloo beside NCCL, which would stage every pickled object (a rank's decoded
#: images, the feature matrix) in GPU memory; None (the default group) otherwise
_object_group: Any = None


@dataclass
class Runtime:
    """Where and how tensors are computed in this process."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (no-op when ``amp_dtype`` is None)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),     # float32: no autocast
            "rank": self.rank,
            "world_size": self.world_size,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(),
        }


def _pick_device(device: str, local_rank: int, world: int = 1) -> torch.device:
    """``auto`` and ``cuda``: this rank's GPU (``cuda:LOCAL_RANK``); ``cuda:N`` names one GPU, so only for one
    process (under torchrun every rank would share it and NCCL refuses duplicate GPUs)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if device == "cuda":
            return torch.device(f"cuda:{local_rank}")
        if world > 1:
            raise UsageError(f"--device {device} names one GPU for all {world} processes: under torchrun use "
                             "--device cuda (each process takes the GPU of its LOCAL_RANK)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device}: {exc}") from None


def _cpu_has(*probes: str) -> bool:
    """Whether any of ``torch.cpu``'s private capability probes says yes (False where torch lacks the probe)."""
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX).

    Elsewhere (AVX2-only CPUs: most laptops, many cloud AMD cores) bf16 autocast is emulated, and a resnet18 trains
    about 14 times and infers about 8 times slower than in fp32 (benchmarks/results/notebook.md, section 6)."""
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_native_fp16() -> bool:
    """Whether this CPU computes fp16 in hardware (AMX-FP16, or AVX512-FP16, which every AMX CPU has)."""
    return _cpu_has("_is_amx_fp16_supported", "_is_amx_tile_supported")


def _pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA (fp16 where bf16 is missing), bf16 on a CPU with native bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)        # emulated on pre-Ampere GPUs
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise UsageError(f"--precision {precision}: choose auto, bf16, fp16 or fp32")
    dtype = table[precision]
    native = {torch.bfloat16: cpu_has_native_bf16, torch.float16: cpu_has_native_fp16}
    if device.type == "cpu" and dtype is not None and not native[dtype]() and os.environ.get("RANK", "0") == "0":
        print(f"poisonscan: warning: --precision {precision} is emulated on this CPU (no native {precision} units) "
              "and many times slower than fp32; --precision auto picks fp32 here", file=sys.stderr)
    return dtype


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device and precision; join torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)        # before NCCL, and so that stray allocations land on this GPU
    if world > 1 and not dist.is_initialized():
        global _object_group
        if dev.type == "cuda":            # training's collectives keep NCCL's own timeout; the waits are gloo's
            dist.init_process_group(backend="nccl")
            _object_group = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=DIST_TIMEOUT)
    if dev.type == "cuda":
        # convolutions may use TF32 (torch's default); fp32 matrix products stay exact, since k-means assignments,
        # attention maps and window scores outside autocast would otherwise differ from a CPU run's
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Runtime(dev, _pick_precision(precision, dev), rank, world, local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_object_group)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a one-element list without distributed), through host memory."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send ``obj`` from rank ``src`` to every rank, through host memory."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group)
    return box[0]


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank (sizes may differ)."""
    if not is_distributed():
        return t
    parts = all_gather_object(t.detach().cpu())
    return torch.cat(parts, dim=0)


def shard_indices(n: int, rank: int, world: int) -> range:
    """Contiguous share of ``range(n)`` for ``rank``: no index lost or duplicated."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def split_gather(runtime: Runtime, n: int, work: Callable[[range], Any]) -> list[Any]:
    """Run ``work`` on this rank's contiguous share of ``range(n)``; the shares of all ranks, in rank order."""
    part = work(shard_indices(n, runtime.rank, runtime.world_size))
    return all_gather_object(part) if runtime.world_size > 1 else [part]


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self._p, self._t = progress, task

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)

    def update(self, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._t, **fields)


@contextlib.contextmanager
def progress(description: str, total: int | None, quiet: bool = False) -> Iterator[_Bar]:
    """A rich progress bar on stderr, shown on rank 0 only when stderr is a terminal."""
    show = (not quiet) and sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
    if not show:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(description, total=total, info="")
        yield _Bar(p, task)
