"""Pure metric functions on numpy arrays: detection quality, ranking, boxes, classification, clusters.

Conventions: ``y_true`` is 0/1 (1 = poisoned / positive), scores are "higher = more suspect". Every function is
deterministic; ties are handled explicitly (average ranks for AUROC, shared thresholds for curves, the expected value
under random tie-breaking for precision@k). Definitions: docs/commands/eval.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "binary_counts", "precision_recall_f1", "roc_curve", "auroc", "precision_recall_curve", "average_precision",
    "tpr_at_fpr", "precision_at_k", "box_intersection", "box_iou", "box_catch_rate", "topk_trigger_accuracy",
    "confusion_matrix", "accuracy_from_confusion", "target_false_positives", "attack_success_rate",
    "poison_cluster_purity",
]


def _as_binary(y_true: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError("y_true must be one-dimensional")
    if y.size and not np.isin(y, (0, 1, True, False)).all():
        raise ValueError("y_true must hold only 0/1 values")
    return y.astype(bool)


def _as_scores(scores: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN (give unscored samples the lowest score)")
    return s


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


# ----------------------------------------------------------------------------------------------- binary decisions
def binary_counts(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> dict[str, int]:
    """True/false positives/negatives of 0/1 predictions."""
    t, p = _as_binary(y_true), _as_binary(y_pred)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have the same length")
    return {"tp": int((t & p).sum()), "fp": int((~t & p).sum()), "fn": int((t & ~p).sum()),
            "tn": int((~t & ~p).sum())}


def precision_recall_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Recall, precision, F1 and the number flagged (``removed``) of 0/1 predictions (0 where undefined)."""
    c = binary_counts(y_true, y_pred)
    precision = _safe_div(c["tp"], c["tp"] + c["fp"])
    recall = _safe_div(c["tp"], c["tp"] + c["fn"])
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"recall": recall, "precision": precision, "f1": f1, "removed": c["tp"] + c["fp"], **c}


# ----------------------------------------------------------------------------------------------- ranking curves
def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) when flagging every sample with score >= each distinct threshold (descending)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1] if y_sorted.size else np.array([], int)
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s_sorted[last_of_run]


def roc_curve(y_true: Sequence[int] | np.ndarray,
              scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score plus the origin (threshold +inf)."""
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    tps, fps, thr = _threshold_counts(y, s)
    n_pos, n_neg = y.sum(), (~y).sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.zeros(tps.size + 1)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.zeros(fps.size + 1)
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); ``None`` with one class only."""
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run of ties
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_recall_curve(y_true: Sequence[int] | np.ndarray,
                           scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` at every distinct threshold, highest threshold first."""
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    tps, fps, thr = _threshold_counts(y, s)
    n_pos = y.sum()
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / n_pos if n_pos else np.zeros_like(tps)
    return precision, recall, thr


def average_precision(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the precision-recall curve as the step sum ``sum_n (R_n - R_{n-1}) P_n`` (no interpolation).

    ``None`` when there is no positive.
    """
    y = _as_binary(y_true)
    if not y.any():
        return None
    precision, recall, _ = precision_recall_curve(y, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tpr_at_fpr(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
               max_fpr: float) -> float | None:
    """The highest true-positive rate of any threshold whose false-positive rate is ``<= max_fpr``."""
    y = _as_binary(y_true)
    if not y.any() or y.all():
        return None
    fpr, tpr, _ = roc_curve(y, scores)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def precision_at_k(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> float | None:
    """Share of positives among the ``k`` highest scores; ties at the cut count by their expected share."""
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    k = min(int(k), y.size)
    if k <= 0:
        return None
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    take_from_tied = k - int(above.sum())
    expected_tied_pos = take_from_tied * y[tied].sum() / tied.sum()
    return float((y[above].sum() + expected_tied_pos) / k)


# ----------------------------------------------------------------------------------------------- boxes
def _boxes(b: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(b, dtype=np.float64)
    return arr.reshape(-1, 4) if arr.ndim == 1 else arr


def box_intersection(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Row-wise intersection area of ``(x, y, w, h)`` boxes (broadcasts N x 4 with N x 4 or 1 x 4)."""
    a, b = _boxes(a), _boxes(b)
    iw = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def box_iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Row-wise intersection over union of ``(x, y, w, h)`` boxes (0 where the union is empty)."""
    a, b = _boxes(a), _boxes(b)
    inter = box_intersection(a, b)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_catch_rate(true_box: Sequence[float] | np.ndarray, window: Sequence[float] | np.ndarray) -> np.ndarray:
    """Row-wise share of the true trigger box's area inside the retrieved window (catch rate, VI-C)."""
    t, w = _boxes(true_box), _boxes(window)
    inter = box_intersection(t, w)
    area = t[:, 2] * t[:, 3]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def topk_trigger_accuracy(windows: np.ndarray, true_boxes: np.ndarray,
                          ks: Sequence[int] = (5, 10, 20, 50, 100)) -> dict[int, dict[str, float | int]]:
    """Quality of the first ``k`` retrieved candidate triggers, for every ``k`` in ``ks``.

    ``windows``: M x 4 candidate windows in retrieval order. ``true_boxes``: M x 4 true trigger boxes of those images
    in the same frame, NaN rows for images without a trigger (clean images), which count as wrong with IoU and catch
    rate 0. A candidate is correct when its window overlaps its true box (intersection area > 0). ``k`` larger than
    ``M`` uses the ``M`` candidates there are (``n`` says how many).
    """
    windows, true_boxes = _boxes(windows), _boxes(true_boxes)
    has_box = ~np.isnan(true_boxes).any(axis=1)
    tb = np.where(has_box[:, None], true_boxes, 0.0)
    inter = box_intersection(windows, tb) * has_box
    correct = inter > 0
    iou = box_iou(windows, tb) * has_box
    catch = box_catch_rate(tb, windows) * has_box
    out: dict[int, dict[str, float | int]] = {}
    for k in ks:
        n = min(int(k), windows.shape[0])
        out[int(k)] = {
            "n": n,
            "accuracy": float(correct[:n].mean()) if n else 0.0,
            "mean_iou": float(iou[:n].mean()) if n else 0.0,
            "catch_rate": float(catch[:n].mean()) if n else 0.0,
            "poisoned": int(has_box[:n].sum()),
        }
    return out


# ----------------------------------------------------------------------------------------------- classification
def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     n_classes: int | None = None) -> np.ndarray:
    """``C[i, j]`` = number of samples of true class ``i`` predicted as ``j`` (int64, n_classes x n_classes)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have the same length")
    n = int(n_classes if n_classes is not None else max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= n or p.max() >= n):
        raise ValueError(f"class index out of range 0..{n - 1}")
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)


def accuracy_from_confusion(conf: np.ndarray) -> float:
    """Top-1 accuracy: the trace over the total."""
    return _safe_div(np.trace(conf), conf.sum())


def target_false_positives(conf: np.ndarray, target: int) -> int:
    """Images of other classes predicted as ``target``: ``conf[:, t].sum() - conf[t, t]``."""
    return int(conf[:, target].sum() - conf[target, target])


def attack_success_rate(conf_patched: np.ndarray, target: int) -> float:
    """FP of the target on the patched set over the number of non-target images in it."""
    non_target = int(conf_patched.sum() - conf_patched[target].sum())
    return _safe_div(target_false_positives(conf_patched, target), non_target)


# ----------------------------------------------------------------------------------------------- clusters
def poison_cluster_purity(cluster_labels: Sequence[int] | np.ndarray, poisoned: Sequence[int] | np.ndarray,
                          top: int = 3) -> dict[str, object]:
    """How pure the clusters holding the most poisons are.

    Takes the ``top`` clusters with the most poisons (ties: the purer, then the lower id). ``purity`` = poisons in them
    / their total size; ``poison_share`` = poisons in them / all poisons; ``clusters`` lists each one.
    """
    labels = np.asarray(cluster_labels, dtype=np.int64)
    y = _as_binary(poisoned)
    if labels.shape != y.shape:
        raise ValueError("cluster_labels and poisoned must have the same length")
    n_poisons = int(y.sum())
    if labels.size == 0 or n_poisons == 0:
        return {"purity": None, "poison_share": None, "n_poisons": n_poisons, "clusters": []}
    n = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=n)
    pois = np.bincount(labels[y], minlength=n)
    purity = np.divide(pois, sizes, out=np.zeros(n), where=sizes > 0)
    order = np.lexsort((np.arange(n), -purity, -pois))
    chosen = [int(c) for c in order[:top] if pois[c] > 0]
    in_top = int(pois[chosen].sum())
    return {
        "purity": _safe_div(in_top, sizes[chosen].sum()),
        "poison_share": _safe_div(in_top, n_poisons),
        "n_poisons": n_poisons,
        "clusters": [{"cluster": c, "size": int(sizes[c]), "poisons": int(pois[c]), "purity": float(purity[c])}
                     for c in chosen],
    }


def nan_to_none(x: float | None) -> float | None:
    """JSON-friendly float: NaN and infinities become ``None``."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x
