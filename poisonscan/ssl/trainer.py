"""Self-supervised pretraining: one loop for CPU, one GPU and torchrun DDP (the world size decides).

The data set is decoded once into a uint8 :class:`ImageStore`; every step takes a batch of it, draws two augmented
views on the device (:class:`SSLAugment`) and makes one optimiser step on the method's loss. Each epoch ends with an
atomic ``last.pt`` (full state, loadable with ``weights_only=True``), ``encoder.safetensors`` and the logs, so an
interrupted run resumes from its last epoch and ends with the same weights as an uninterrupted one.

Its length is one training loop kept readable top to bottom, nanoGPT-style: the same path for one process
and for torchrun, with its checkpoint, resume and monitor beside it rather than spread over modules.
"""

from __future__ import annotations

import io
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from poisonscan import runtime as rt
from poisonscan.config import PretrainConfig
from poisonscan.settings import resolve_config
from poisonscan.data.transforms import SSLAugment
from poisonscan.detect.features import encode, eval_mode
from poisonscan.errors import CheckpointError, UsageError
from poisonscan.eval.knn import knn_vote
from poisonscan.runs import INVOCATION_SETTINGS, RunDir, config_record, create_run, releases_run_locks
from poisonscan.ssl.methods import SSLMethod, create_method

CHECKPOINT = "last.pt"
ENCODER = "encoder.safetensors"
CHECKPOINT_FORMAT = 1

# base learning rate (at batch 256) and weight decay per optimiser when the config leaves them unset
OPTIMIZER_DEFAULTS: dict[str, tuple[float, float]] = {
    "sgd": (0.5, 5e-4),      # SimCLR at small scale (the measured CPU threat model recipe)
    "lars": (0.3, 1e-6),     # SimCLR / MoCo v3 ResNet recipe
    "adamw": (1.5e-4, 0.1),  # MoCo v3 ViT recipe
}


# -- optimisation ---------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """LARS (SGD + momentum with layer-wise trust ratio); 1-d parameters (biases, norms) get neither weight decay
    nor adaptation, as in MoCo v3's implementation."""

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    q = torch.where((pn > 0) & (un > 0), g["trust_coefficient"] * pn / un, torch.ones_like(pn))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def resolve_optimizer(name: str, arch: str) -> str:
    """``auto`` -> AdamW for ViTs, SGD (nesterov) for CNNs."""
    name = name.lower()
    if name == "auto":
        return "adamw" if "vit" in arch.lower() else "sgd"
    if name not in OPTIMIZER_DEFAULTS:
        raise UsageError(f"--optimizer {name}: choose auto, sgd, lars or adamw")
    return name


def build_optimizer(model: nn.Module, name: str, weight_decay: float) -> torch.optim.Optimizer:
    """Optimiser over the trainable parameters; weight decay only on weights with more than one dimension."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    if name == "lars":
        return LARS([{"params": params}], weight_decay=weight_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def head_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    """Method keyword arguments from the config (``None`` leaves the method's default)."""
    kw: dict[str, Any] = {"temperature": cfg.temperature, "proj_dim": cfg.proj_dim}
    if cfg.method.lower().startswith("moco"):
        kw.update(hidden=cfg.proj_hidden, pred_hidden=cfg.proj_hidden)
    else:
        kw.update(proj_hidden=cfg.proj_hidden)
    return kw


# -- data order and randomness ------------------------------------------------------------------------------
def epoch_batches(n: int, global_batch: int, epoch: int, seed: int, rank: int = 0,
                  world: int = 1) -> list[torch.Tensor]:
    """This rank's index batches of one epoch: a permutation seeded by ``(seed, epoch)``, cut into global batches
    (the last incomplete one dropped), each split into ``world`` equal local parts."""
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    local = global_batch // world
    return [perm[s * global_batch + rank * local: s * global_batch + (rank + 1) * local]
            for s in range(n // global_batch)]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A fresh CPU generator for one step's augmentation (stateless: resuming needs no generator state)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain tensors/ints (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()              # this process's GPU only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):             # one state per GPU of the saving machine: this process's, if any
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# -- k-NN monitor ---------------------------------------------------------------------------------------------
def embed(encoder: nn.Module, images_u8: torch.Tensor, runtime: rt.Runtime, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised float32 features of uint8 images on the runtime's device, resized to the encoder's input size
    when needed: detect's encode path (``detect.features.encode``) in batches, the encoder in eval mode meanwhile."""
    size = int(getattr(encoder, "image_size", images_u8.shape[-1]))
    with eval_mode(encoder):
        return torch.cat([encode(encoder, images_u8[i:i + batch_size], runtime, to_cpu=False, size=size)
                          for i in range(0, images_u8.shape[0], batch_size)])


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of the weighted k-NN vote (``knn_vote``) on L2-normalised rows."""
    classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    pred = knn_vote(bank, bank_labels, query, classes, k, temperature, chunk=chunk)
    return int((pred == query_labels.to(pred.device)).sum()) / max(query.shape[0], 1)


# -- checkpoints ----------------------------------------------------------------------------------------------
def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read ``last.pt`` (a run folder or the file) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (resume needs a pretrain run folder holding {CHECKPOINT})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a poisonscan pretrain checkpoint")
    return ckpt


def resume_config(run_path: Path | str, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The config stored in a run's checkpoint, with ``overrides`` (flags given again) applied on top; the
    invocation switches (``quiet``, ...) and the ``store_cache`` folder written to are this invocation's own,
    whatever the checkpoint holds."""
    ckpt = load_checkpoint(run_path)
    run_dir = Path(run_path) if Path(run_path).is_dir() else Path(run_path).parent
    saved = {k: v for k, v in ckpt["config"].items() if k not in INVOCATION_SETTINGS}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cache = saved.pop("store_cache", None)      # where this process writes is chosen by its flags, not by the run
    if cache and "store_cache" not in given and os.environ.get("RANK", "0") == "0":
        print(f"poisonscan: warning: {run_dir}'s image cache {cache} is not reused on --resume unless --store-cache "
              "names it again; decoding the data anew", file=sys.stderr, flush=True)
    values = {**saved, **given}
    values.update(resume=str(run_dir), out=str(run_dir))
    return resolve_config(PretrainConfig, None, values)


def _save_checkpoint(run: RunDir, method: SSLMethod, opt: torch.optim.Optimizer, scaler: Any,
                     cfg: PretrainConfig, epoch: int, step: int, history: list[dict[str, Any]]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "model": method.state_dict(),
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
             "config": config_record(cfg), "history": history, "method": method.hparams()}
    buf = io.BytesIO()
    torch.save(state, buf)
    run.write_bytes(CHECKPOINT, buf.getvalue())


def snapshot_name(epoch: int) -> str:
    """File name of the encoder kept at ``epoch`` by ``--keep-every``."""
    return f"encoder-e{epoch:03d}.safetensors"


def _save_encoder(run: RunDir, method: SSLMethod, cfg: PretrainConfig, epochs_done: int) -> Path:
    """Write ``encoder.safetensors`` (and a kept snapshot every ``cfg.keep_every`` epochs)."""
    from poisonscan.models import save_encoder

    meta: dict[str, Any] = {"method": method.name, "epochs": epochs_done, "data": cfg.data, "seed": cfg.seed,
                            "ssl": method.hparams()}
    if cfg.save_fp16:
        meta["dtype"] = torch.float16
    path = run.file(ENCODER)
    save_encoder(method.encoder, path, **meta)
    if cfg.keep_every and epochs_done % cfg.keep_every == 0:
        run.write_bytes(snapshot_name(epochs_done), path.read_bytes())
    return path


# -- the loop -------------------------------------------------------------------------------------------------
def _log(msg: str, quiet: bool) -> None:
    if not quiet and int(dist.get_rank() if rt.is_distributed() else 0) == 0:
        print(msg, file=sys.stderr, flush=True)


def _write_logs(run: RunDir, history: list[dict[str, Any]]) -> None:
    cols = ["epoch", "step", "loss", "lr", "images_per_s", "time_s", "knn_acc", "knn_asr"]
    lines = [",".join(cols)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" if isinstance(row[c], float)
                              else str(row[c]) for c in cols))
    run.write_text("log.csv", "\n".join(lines) + "\n")
    run.write_json("log.json", history)
    monitored = [r for r in history if r.get("knn_acc") is not None]
    if history and history[-1].get("knn_acc") is not None:          # redraw only when the monitor ran
        from poisonscan.eval.plots import line_chart

        epochs = [r["epoch"] for r in monitored]
        series = [("k-NN accuracy", epochs, [r["knn_acc"] for r in monitored])]
        if any(r.get("knn_asr") is not None for r in monitored):
            series.append(("k-NN ASR (trigger pasted)", epochs,
                           [r.get("knn_asr") or 0.0 for r in monitored]))
        run.write_bytes("monitor.png", line_chart(series, title="Threat model during pretraining", xlabel="epoch",
                                                   ylabel="share of val images", ylim=(0.0, 1.0)))


def _all_mean(x: torch.Tensor) -> float:
    if rt.is_distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


class Pretrainer:
    """Holds the state of one pretraining run; :meth:`fit` trains to ``cfg.epochs`` (or ``stop_after_epoch``)."""

    def __init__(self, cfg: PretrainConfig, run: RunDir, runtime: rt.Runtime, images: torch.Tensor,
                 labels: list[int | None] | None = None, knn_val: tuple[torch.Tensor, list[int | None]] | None = None
                 ) -> None:
        from poisonscan.models import create_encoder

        self.cfg, self.run, self.runtime = cfg, run, runtime
        self.images, self.labels, self.knn_val = images, labels, knn_val
        self.backdoor: tuple[torch.Tensor, int] | None = None  # (patched val images, target) for the ASR monitor
        world = runtime.world_size
        if cfg.batch_size % world:
            raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
        if cfg.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        self.steps_per_epoch = images.shape[0] // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the data set ({images.shape[0]} images)")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.opt_name = resolve_optimizer(cfg.optimizer, cfg.arch)
        base_lr, base_wd = OPTIMIZER_DEFAULTS[self.opt_name]
        self.peak_lr = (cfg.lr if cfg.lr is not None else base_lr) * cfg.batch_size / 256
        self.weight_decay = cfg.weight_decay if cfg.weight_decay is not None else base_wd

        rt.seed_everything(cfg.seed)
        encoder = create_encoder(cfg.arch, cfg.image_size)
        self.method = create_method(cfg.method, encoder, **head_kwargs(cfg))
        self.method.to(runtime.device, memory_format=torch.channels_last)
        if runtime.distributed and runtime.device.type == "cuda":
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.model: nn.Module = self.method
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids)
        self.optimizer = build_optimizer(self.method, self.opt_name, self.weight_decay)
        fp16 = runtime.amp_dtype == torch.float16 and runtime.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.augment = SSLAugment(cfg.image_size, mean=encoder.mean, std=encoder.std)
        self.epoch, self.step, self.history = 0, 0, []
        self.skipped, self.last_lr = 0, 0.0

    # state ---------------------------------------------------------------------------------------------------
    def load(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint written by this class."""
        try:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not match this model/optimiser: {str(exc)[:300]}") from None
        if ckpt["scaler"] and self.scaler.is_enabled():     # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])
        set_rng_state(ckpt["rng"])

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, u8: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a uint8 batch; returns the (detached) loss."""
        lr = self._set_lr()
        gen = step_generator(self.cfg.seed, self.step, self.runtime.rank)
        views = self.augment(u8.to(self.runtime.device, non_blocking=True), gen)
        with self.runtime.autocast():
            loss = self.model(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.method.parameters() if p.grad is not None], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.method.after_step(self.step, self.total_steps)
        self.last_lr = lr
        return loss.detach()

    def _batches(self, epoch: int) -> Iterator[torch.Tensor]:
        for idx in epoch_batches(self.images.shape[0], self.cfg.batch_size, epoch, self.cfg.seed,
                                 self.runtime.rank, self.runtime.world_size):
            yield self.images[idx]

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Average floating buffers (BatchNorm running statistics) over ranks so every rank holds the same state."""
        if not rt.is_distributed():
            return
        bufs = [b for b in self.method.buffers() if b.is_floating_point()]
        for b in bufs:
            dist.all_reduce(b)
        torch._foreach_div_(bufs, float(dist.get_world_size()))

    def knn(self) -> tuple[float | None, float | None]:
        """k-NN accuracy of the current encoder on the val set (train set as the bank) and, when a trigger and target
        were given, the k-NN ASR: the share of non-target val images predicted as the target with the trigger
        pasted. ``(None, None)`` without labels."""
        if self.knn_val is None or self.labels is None or any(v is None for v in self.labels):
            return None, None
        val_images, val_labels = self.knn_val
        if any(v is None for v in val_labels):
            return None, None
        result: tuple[float | None, float | None] = (None, None)
        if self.runtime.is_main:
            bank = embed(self.method.encoder, self.images, self.runtime)
            bank_labels = torch.tensor(self.labels, device=bank.device)
            query = embed(self.method.encoder, val_images, self.runtime)
            labels = torch.tensor(val_labels, device=bank.device)
            acc = knn_accuracy(bank, bank_labels, query, labels)
            asr = None
            if self.backdoor is not None:
                patched, target = self.backdoor
                keep = labels != target
                if bool(keep.any()):
                    q = embed(self.method.encoder, patched, self.runtime)[keep]
                    asr = knn_accuracy(bank, bank_labels, q, torch.full_like(labels[keep], target))
            result = (acc, asr)
        return rt.broadcast_object(result)

    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train from the current epoch to ``cfg.epochs`` (or stop after ``stop_after_epoch``); returns a summary."""
        cfg, start = self.cfg, time.perf_counter()
        last_epoch = min(cfg.epochs, stop_after_epoch) if stop_after_epoch else cfg.epochs
        self.model.train()
        trained_images = 0
        with rt.progress("pretrain", total=(last_epoch - self.epoch) * self.steps_per_epoch, quiet=cfg.quiet) as bar:
            while self.epoch < last_epoch:
                t0, loss_sum, n = time.perf_counter(), torch.zeros((), device=self.runtime.device), 0
                for u8 in self._batches(self.epoch):
                    loss_sum += self.train_step(u8)
                    n += 1
                    bar.advance(1)
                    if n % 10 == 0 or n == self.steps_per_epoch:
                        ips = n * cfg.batch_size / (time.perf_counter() - t0)
                        bar.update(info=f"ep {self.epoch + 1}/{cfg.epochs} loss {float(loss_sum) / n:.3f} "
                                        f"{ips:.0f} img/s")
                self.epoch += 1
                self._sync_buffers()
                elapsed = time.perf_counter() - t0
                trained_images += n * cfg.batch_size
                row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "loss": _all_mean(loss_sum / n),
                                       "lr": self.last_lr, "images_per_s": n * cfg.batch_size / elapsed,
                                       "time_s": elapsed}
                if cfg.knn_val and cfg.knn_every and (self.epoch % cfg.knn_every == 0 or self.epoch == cfg.epochs):
                    row["knn_acc"], row["knn_asr"] = self.knn()
                self.history.append(row)
                if self.runtime.is_main:
                    _save_checkpoint(self.run, self.method, self.optimizer, self.scaler, cfg, self.epoch,
                                     self.step, self.history)
                    _save_encoder(self.run, self.method, cfg, self.epoch)
                    _write_logs(self.run, self.history)
                rt.barrier()
                knn = f" knn {row['knn_acc']:.3f}" if row.get("knn_acc") is not None else ""
                knn += f" knn-asr {row['knn_asr']:.3f}" if row.get("knn_asr") is not None else ""
                _log(f"epoch {self.epoch}/{cfg.epochs} loss {row['loss']:.4f} lr {row['lr']:.4g} "
                     f"{row['images_per_s']:.0f} img/s{knn}", cfg.quiet or sys.stderr.isatty())
        wall = time.perf_counter() - start
        last = self.history[-1] if self.history else {}
        knn_vals = [r["knn_acc"] for r in self.history if r.get("knn_acc") is not None]
        return {"run": str(self.run.path), "method": self.method.name, "arch": cfg.arch,
                "image_size": cfg.image_size, "epochs": self.epoch, "steps": self.step,
                "final_loss": last.get("loss"), "time_s": wall,
                "images_per_s": trained_images / wall if trained_images else None,
                "optimizer": self.opt_name, "lr": self.peak_lr, "weight_decay": self.weight_decay,
                "batch_size": cfg.batch_size, "world_size": self.runtime.world_size,
                "device": str(self.runtime.device), "precision": self.runtime.describe()["precision"],
                "knn_acc": knn_vals[-1] if knn_vals else None,
                "encoder": str(self.run.file(ENCODER)), "checkpoint": str(self.run.file(CHECKPOINT))}


# -- entry point ----------------------------------------------------------------------------------------------
def _load_store(spec: str, size: int, runtime: rt.Runtime, cfg: PretrainConfig, cache: Path | None) -> Any:
    """Decode ``spec`` once into a uint8 ImageStore at ``size`` (each rank decodes a share under DDP)."""
    from poisonscan.data.sources import open_source
    from poisonscan.data.store import build_store

    return build_store(open_source(spec), size, path=cache, runtime=runtime, quiet=cfg.quiet or not runtime.is_main,
                       num_workers=cfg.num_workers)


def build_trainer(cfg: PretrainConfig, run: RunDir | None = None,
                  runtime: rt.Runtime | None = None) -> Pretrainer:
    """Create (or, with ``cfg.resume``, reopen) the run folder, decode the data once and build the trainer."""
    if not cfg.data:
        raise UsageError("pretrain needs --data (an image folder, file list, manifest or WebDataset shards)")
    runtime = runtime or rt.setup_runtime(cfg.device, cfg.precision)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        resume_dir = Path(cfg.resume) if Path(cfg.resume).is_dir() else Path(cfg.resume).parent
        run = run or create_run("pretrain", resume_dir, resume=True)
    elif run is None:
        made = create_run("pretrain", Path(cfg.out) if cfg.out else None,
                          overwrite=cfg.overwrite) if runtime.is_main else None
        name = rt.broadcast_object(str(made.path) if made is not None else None)
        run = made if made is not None else RunDir(name)
    cache = Path(cfg.store_cache) if cfg.store_cache else None
    store = _load_store(cfg.data, cfg.image_size, runtime, cfg, cache)
    knn_val = None
    if cfg.knn_val:
        val_cache = (cache.parent / (cache.name + "-knn")) if cache is not None else None
        val = _load_store(cfg.knn_val, cfg.image_size, runtime, cfg, val_cache)
        knn_val = (val.images, list(val.labels))
    trainer = Pretrainer(cfg, run, runtime, store.images, list(store.labels), knn_val)
    if cfg.backdoor_trigger or cfg.backdoor_target is not None:
        if not (cfg.knn_val and cfg.backdoor_trigger and cfg.backdoor_target is not None):
            raise UsageError("the backdoor monitor needs --knn-val, --backdoor-trigger and --backdoor-target")
        from poisonscan.eval.patching import paste_trigger_batch, read_trigger
        from poisonscan.eval.probe import resolve_class

        target = resolve_class(cfg.backdoor_target, val.class_names or store.class_names, Path(cfg.knn_val))
        patched, _ = paste_trigger_batch(val.images, read_trigger(cfg.backdoor_trigger),
                                         size=cfg.backdoor_trigger_size, seed=cfg.seed)
        trainer.backdoor = (patched, target)
    trainer.skipped = len(store.errors)
    if ckpt is not None:
        trainer.load(ckpt)
    if runtime.is_main:
        run.write_config(cfg)
        run.write_environment(cfg.seed, runtime)
        if store.errors:
            _log(f"warning: {len(store.errors)} samples could not be decoded and were left out", cfg.quiet)
    return trainer


@releases_run_locks
def run_pretrain(cfg: PretrainConfig, run: RunDir | None = None, runtime: rt.Runtime | None = None,
                 stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Pretrain ``cfg.method`` on ``cfg.data`` into a run folder (``cfg.resume`` continues that run).

    Returns the summary (epochs, final loss, time, images/s, paths); writes ``config.json``, ``environment.json``,
    ``last.pt``, ``encoder.safetensors``, ``log.csv``, ``log.json``, ``summary.json``, ``stages/pretrain.done``.
    The run folder is locked while this runs; a new folder is removed again when it fails before writing to it.
    """
    trainer = build_trainer(cfg, run, runtime)
    summary = trainer.fit(stop_after_epoch)
    summary.update(images=int(trainer.images.shape[0]), skipped=trainer.skipped, data=cfg.data)
    if trainer.runtime.is_main:
        trainer.run.write_json("summary.json", summary)
        if trainer.epoch >= cfg.epochs:
            trainer.run.mark_done("pretrain", {"epochs": trainer.epoch, "final_loss": summary["final_loss"]})
    rt.barrier()
    return summary


__all__ = ["LARS", "Pretrainer", "build_optimizer", "build_trainer", "embed", "epoch_batches", "knn_accuracy",
           "load_checkpoint", "lr_at", "resolve_optimizer", "resume_config", "run_pretrain", "step_generator"]
