"""Linear probe on frozen encoder features: ACC on clean and patched val, FP of the target, ASR.

MoCo v3 style on cached features: a linear layer on standardised features (train mean/std, like the BatchNorm
without affine parameters of MAE's probe), SGD momentum 0.9 with lr ``0.1 x batch / 256`` (or Adam), cosine decay,
no weight decay. Trains in seconds on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonscan.errors import DataError, UsageError
from poisonscan.eval import metrics as M

__all__ = ["LinearProbe", "stratified_subset", "linear_probe", "probe_predict", "probe_report",
           "confusion_csv", "check_labels", "resolve_class"]


class LinearProbe(nn.Module):
    """Standardise the features with fixed train statistics, then one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.linear = nn.Linear(mean.numel(), n_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats.float() - self.mean) / self.std)


def check_labels(labels: Sequence[int | None], what: str) -> np.ndarray:
    """Labels as int64, or ``DataError`` when any is missing."""
    missing = sum(label is None for label in labels)
    if missing:
        raise DataError(f"{what}: {missing} of {len(labels)} samples have no label (use an ImageFolder layout, a "
                        f"file list with labels, or WebDataset shards with .cls members)")
    return np.asarray(labels, dtype=np.int64)


def stratified_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0,
                      min_per_class: int = 1) -> np.ndarray:
    """Sorted indices of a seeded stratified sample: ``max(min_per_class, round(fraction x n_c))`` of each class."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        take = min(members.size, max(min_per_class, int(round(fraction * members.size))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def linear_probe(train_feats: np.ndarray, train_labels: Sequence[int] | np.ndarray, n_classes: int | None = None,
                 *, epochs: int = 100, batch_size: int = 256, lr: float | None = None, optimizer: str = "sgd",
                 seed: int = 0, device: str | torch.device = "cpu") -> LinearProbe:
    """Train a :class:`LinearProbe` on ``train_feats`` (N x D) and integer labels (cosine schedule, no wd).

    ``lr`` defaults to ``0.1 x batch_size / 256`` for SGD (momentum 0.9) and ``1e-3`` for Adam.
    """
    x = torch.as_tensor(np.asarray(train_feats, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(train_labels, dtype=np.int64), device=device)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need N x D features and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    n_classes = int(n_classes if n_classes is not None else int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    if optimizer not in ("sgd", "adam"):
        raise UsageError(f"probe optimizer must be sgd or adam, got {optimizer!r}")
    if epochs < 1 or batch_size < 1:
        raise UsageError("probe epochs and batch size must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    std = x.std(0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1], device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe(x.mean(0), std, n_classes).to(device)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr or 0.1 * batch_size / 256,
                                                     momentum=0.9, weight_decay=0.0)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr or 1e-3, weight_decay=0.0)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def probe_predict(model: LinearProbe, feats: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Predicted class of each feature row (int64)."""
    device = model.mean.device
    out = []
    for start in range(0, len(feats), batch_size):
        chunk = torch.as_tensor(np.asarray(feats[start:start + batch_size], dtype=np.float32), device=device)
        out.append(model(chunk).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def _set_metrics(conf: np.ndarray) -> dict[str, Any]:
    return {"n": int(conf.sum()), "accuracy": M.accuracy_from_confusion(conf), "confusion": conf.tolist()}


def probe_report(model: LinearProbe, val_feats: np.ndarray, val_labels: Sequence[int] | np.ndarray,
                 targets: Sequence[int], patched_feats: np.ndarray | None = None,
                 patched_labels: Sequence[int] | np.ndarray | None = None,
                 class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """ACC on clean (and patched) val, and for each target: FP on each set, FP rate, ASR; confusion matrices.

    ``fp_*`` = non-target images predicted as the target; ``asr`` = ``fp_patched`` / non-target patched images;
    ``fp_rate_clean`` is the same share on the clean set (the attack's baseline).
    """
    n_classes = model.n_classes
    conf_clean = M.confusion_matrix(val_labels, probe_predict(model, val_feats), n_classes)
    conf_patched = None
    if patched_feats is not None:
        if patched_labels is None:
            raise ValueError("patched_labels are needed with patched_feats")
        conf_patched = M.confusion_matrix(patched_labels, probe_predict(model, patched_feats), n_classes)
    rows = []
    for t in targets:
        if not 0 <= int(t) < n_classes:
            raise UsageError(f"target class {t} is outside 0..{n_classes - 1}")
        t = int(t)
        entry: dict[str, Any] = {
            "target": t,
            "name": class_names[t] if class_names and t < len(class_names) else str(t),
            "non_target_clean": int(conf_clean.sum() - conf_clean[t].sum()),
            "fp_clean": M.target_false_positives(conf_clean, t),
            "fp_rate_clean": M.attack_success_rate(conf_clean, t),
        }
        if conf_patched is not None:
            entry.update({"non_target_patched": int(conf_patched.sum() - conf_patched[t].sum()),
                          "fp_patched": M.target_false_positives(conf_patched, t),
                          "asr": M.attack_success_rate(conf_patched, t)})
        rows.append(entry)
    return {
        "n_classes": n_classes,
        "class_names": list(class_names) if class_names else [str(i) for i in range(n_classes)],
        "clean": _set_metrics(conf_clean),
        "patched": _set_metrics(conf_patched) if conf_patched is not None else None,
        "targets": rows,
    }


def confusion_csv(conf: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """A confusion matrix as CSV text: rows = true class, columns = predicted class."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, np.asarray(conf).tolist()):
        writer.writerow([name, *row])
    return buf.getvalue()


def _class_table(root: Path | None) -> dict[str, str]:
    """Readable name -> class folder name from a ``classes.tsv`` (``index, wnid, name``) beside the data."""
    table: dict[str, str] = {}
    for folder in ([root, root.parent] if root is not None else []):
        path = folder / "classes.tsv"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            cells = line.split("\t")
            if len(cells) >= 3:
                table[cells[2].strip().lower()] = cells[1].strip()
        break
    return table


def resolve_class(target: str | int, class_names: Sequence[str] | None, root: Path | None = None) -> int:
    """Class index of ``target``: a class name of the source, a readable name from ``classes.tsv`` beside it, or an
    index. ``UsageError`` when it is none of these."""
    name = str(target).strip()
    names = list(class_names or [])
    if name in names:
        return names.index(name)
    folder = _class_table(root).get(name.lower())
    if folder is not None and folder in names:
        return names.index(folder)
    if name.lstrip("-").isdigit():
        idx = int(name)
        if idx < 0 or (names and idx >= len(names)):
            raise UsageError(f"target class index {idx} is outside 0..{len(names) - 1}")
        return idx
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    raise UsageError(f"unknown target class {name!r} (classes: {shown or 'none: give an index'})")
