"""Detection quality of a ``detect`` run against the ground truth written by ``poison`` (Table II, VI-C).

``read_truth`` and ``read_run`` parse the two inputs, ``map_boxes_to_frame`` brings the true trigger boxes into the
run's ``S x S`` frame (resize short side + centre crop), ``evaluate_detection`` computes every metric and
``detection_plots`` draws the curves. Definitions: docs/commands/eval.md.

Its length is the evaluation's one pass over a run and its truth: the readers, the box mapping and the
metrics share their arrays, and the command's output is defined in one place.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonscan.detect.run import DetectRun
from poisonscan.errors import DataError, UsageError
from poisonscan.eval import metrics as M
from poisonscan.eval.plots import histogram_chart, line_chart

__all__ = ["GroundTruth", "DetectRunScores", "read_truth", "read_run", "map_boxes_to_frame", "evaluate_detection",
           "detection_plots", "flatten_metrics", "DEFAULT_TOPK", "DEFAULT_FPRS"]

DEFAULT_TOPK = (5, 10, 20, 50, 100)
DEFAULT_FPRS = (0.001, 0.01)

TRUTH_COLUMNS = ("sample_id", "poisoned")
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")
SHORT_BOX_COLUMNS = ("x", "y", "w", "h")          # what `poison` writes
WHOLE_IMAGE_ATTACKS = ("blend", "ctrl")          # the trigger covers the whole image
FRAME_BOX_COLUMNS = ("frame_box_x", "frame_box_y", "frame_box_w", "frame_box_h")
#: the columns of scores.csv the evaluation needs (detect/scores.py defines them all)
REQUIRED_COLUMNS = ("index", "id", "poison_score", "box_x", "box_y", "box_w", "box_h", "classifier_prob", "removed",
                    "top_k_rank")


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class GroundTruth:
    """One row per sample of the poisoned data set. Boxes are NaN where a sample has no (localised) trigger."""

    path: Path
    ids: list[str]
    poisoned: np.ndarray                    # bool N
    targets: list[str]                      # "" for clean samples
    target_names: list[str]
    triggers: list[str]
    attacks: list[str]
    boxes: np.ndarray                       # float N x 4 in the poisoned image's own pixels
    image_sizes: np.ndarray                 # float N x 2 (w, h) of the poisoned image, NaN when not given
    frame_boxes: np.ndarray | None = None   # float N x 4 already in a square frame of side ``frame_size``
    frame_size: np.ndarray | None = None    # float N

    def index(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Truth row of each of ``ids`` (int64, ``-1`` where absent). An id the truth does not list as such matches
        the longest truth id it ends with on a path boundary: a cleaned manifest names files by their full path
        (``/data/poisoned/train/cat/x.png``) where the truth names them relative to the data root (``cat/x.png``)."""
        index = self.index()

        def row_of(sid: str) -> int:
            parts = sid.replace("\\", "/").split("/")
            suffixes = (sid, *("/".join(parts[k:]) for k in range(1, len(parts))))   # longest first
            return next((index[s] for s in suffixes if s in index), -1)

        return np.array([row_of(sid) for sid in ids], dtype=np.int64)


@dataclass
class DetectRunScores:
    """The per-sample table of a detect run (``scores.csv``) plus what the evaluation needs from its metadata."""

    path: Path
    ids: list[str]
    poison_score: np.ndarray        # float N, NaN = not scored
    boxes: np.ndarray               # float N x 4, NaN = not scored
    classifier_prob: np.ndarray     # float N, NaN = no classifier output
    removed: np.ndarray             # bool N
    top_k_rank: np.ndarray          # float N, NaN = not in the top-k
    size: int | None                # S, the run's image side
    summary: dict[str, Any] = field(default_factory=dict)
    store_meta: dict[str, Any] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    removal_score: np.ndarray | None = None   # float N (P averaged with its neighbours'); None: a table without it
    picture_match: np.ndarray | None = None   # float N (best match to the recurring picture); None: a table without it


def _float(cell: str | None, what: str, where: str) -> float:
    cell = (cell or "").strip()
    if cell == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{where}: {what} {cell!r} is not a number") from None


def _read_csv(path: Path, required: Sequence[str], what: str) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{what} {path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
    return columns, rows


def _boxes_from(rows: list[dict[str, str]], cols: Sequence[str], where: str) -> np.ndarray:
    out = np.full((len(rows), 4), np.nan)
    for i, row in enumerate(rows):
        vals = [_float(row.get(c), c, f"{where} row {i + 2}") for c in cols]
        if not any(math.isnan(v) for v in vals):
            out[i] = vals
    return out


def read_truth(path: Path | str) -> GroundTruth:
    """Parse a ground-truth CSV (``sample_id, poisoned`` required; ``source_id, target, target_name, trigger,
    attack`` and the box ``box_x..box_h`` or ``x, y, w, h`` in the poisoned image's pixels).

    Optional columns used when present: ``image_w, image_h`` (size of the poisoned image the box refers to) and
    ``frame_box_x..frame_box_h`` with ``frame_size`` (the box already mapped to a square model frame).
    """
    path = Path(path)
    columns, rows = _read_csv(path, TRUTH_COLUMNS, "ground truth")
    if not rows:
        raise DataError(f"ground truth {path} has no rows")
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))
        raise DataError(f"ground truth {path} lists sample {dup!r} more than once")
    poisoned = np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        v = (r["poisoned"] or "").strip().lower()
        if v not in ("0", "1", "true", "false"):
            raise DataError(f"ground truth {path} row {i + 2}: poisoned must be 0 or 1, got {r['poisoned']!r}")
        poisoned[i] = v in ("1", "true")
    box_cols = next((cols for cols in (BOX_COLUMNS, SHORT_BOX_COLUMNS) if all(c in columns for c in cols)), None)
    boxes = _boxes_from(rows, box_cols, str(path)) if box_cols else np.full((len(rows), 4), np.nan)
    boxes[~poisoned] = np.nan
    sizes = np.full((len(rows), 2), np.nan)
    if "image_w" in columns and "image_h" in columns:
        for i, r in enumerate(rows):
            sizes[i] = [_float(r.get("image_w"), "image_w", str(path)), _float(r.get("image_h"), "image_h", str(path))]
    frame_boxes = frame_size = None
    if all(c in columns for c in FRAME_BOX_COLUMNS) and "frame_size" in columns:
        frame_boxes = _boxes_from(rows, FRAME_BOX_COLUMNS, str(path))
        frame_boxes[~poisoned] = np.nan
        frame_size = np.array([_float(r.get("frame_size"), "frame_size", str(path)) for r in rows])
    col = lambda name: [(r.get(name) or "").strip() for r in rows]  # noqa: E731
    targets = [t if p else "" for t, p in zip(col("target"), poisoned)]
    names = [n if p else "" for n, p in zip(col("target_name"), poisoned)]
    return GroundTruth(path, ids, poisoned, targets, names, col("trigger"), col("attack"), boxes, sizes,
                       frame_boxes, frame_size)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path | str) -> DetectRunScores:
    """Read a finished detect run (:class:`~poisonscan.detect.run.DetectRun`: its ``scores.csv`` and
    ``summary.json``), with ``store/store.json`` and ``errors.csv``."""
    detect = DetectRun.load(run_dir)
    run = detect.path
    if not detect.finished or not (run / "scores.csv").is_file():
        raise UsageError(f"detect run {run} has no scores.csv (did detect finish? resume it with --resume)")
    table = detect.read_scores(REQUIRED_COLUMNS)
    if not len(table):
        raise UsageError(f"detect run {run}: scores.csv has no rows")
    poison, prob = table["poison_score"], table["classifier_prob"]
    if np.isnan(poison).all() and np.isnan(prob).all():
        raise UsageError(f"detect run {run} has no scores: every poison_score and classifier_prob is empty")
    summary = detect.summary or {}
    store_meta = _read_json(run / "store" / "store.json")
    size = store_meta.get("size") or summary.get("model", {}).get("image_size")
    return DetectRunScores(run, table.ids, poison, table.boxes, prob, table.removed, table["top_k_rank"],
                           int(size) if size else None, summary, store_meta, detect.unreadable,
                           table["removal_score"] if "removal_score" in table.columns else None,
                           table["picture_match"] if "picture_match" in table.columns else None)


# ----------------------------------------------------------------------------------------------- box mapping
def map_boxes_to_frame(boxes: np.ndarray, sizes: np.ndarray, size: int) -> np.ndarray:
    """Map ``(x, y, w, h)`` boxes of ``W x H`` images into the ``S x S`` frame of resize-short-side + centre crop.

    The short side becomes ``S``, the long side ``int(S * long / short)`` (torchvision's ``Resize``), the crop offset
    is ``round((side - S) / 2)``; boxes are clipped to the frame. Rows whose size is unknown, or whose box falls
    outside the crop, become NaN.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    out = np.full_like(boxes, np.nan)
    ok = ~(np.isnan(boxes).any(1) | np.isnan(sizes).any(1)) & (sizes > 0).all(1)
    if not ok.any():
        return out
    w, h = sizes[ok, 0], sizes[ok, 1]
    short = np.minimum(w, h)
    new_w = np.where(w <= h, size, np.floor(size * w / short))
    new_h = np.where(h <= w, size, np.floor(size * h / short))
    sx, sy = new_w / w, new_h / h
    left, top = np.round((new_w - size) / 2.0), np.round((new_h - size) / 2.0)
    b = boxes[ok]
    x0 = np.clip(b[:, 0] * sx - left, 0, size)
    y0 = np.clip(b[:, 1] * sy - top, 0, size)
    x1 = np.clip((b[:, 0] + b[:, 2]) * sx - left, 0, size)
    y1 = np.clip((b[:, 1] + b[:, 3]) * sy - top, 0, size)
    mapped = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    mapped[(mapped[:, 2] <= 0) | (mapped[:, 3] <= 0)] = np.nan
    out[ok] = mapped
    return out


def _store_sizes(meta: dict[str, Any], ids: list[str]) -> np.ndarray | None:
    """Per-sample original ``(w, h)`` if the run's store.json records them (``image_sizes`` / ``original_sizes``)."""
    for key in ("image_sizes", "original_sizes", "sizes"):
        value = meta.get(key)
        store_ids = meta.get("ids")
        if isinstance(value, list) and isinstance(store_ids, list) and len(value) == len(store_ids):
            lookup = dict(zip(store_ids, value))
            out = np.full((len(ids), 2), np.nan)
            for i, sid in enumerate(ids):
                v = lookup.get(sid)
                if isinstance(v, (list, tuple)) and len(v) == 2:
                    out[i] = v
            return out
        if isinstance(value, dict):
            out = np.full((len(ids), 2), np.nan)
            for i, sid in enumerate(ids):
                v = value.get(sid)
                if isinstance(v, (list, tuple)) and len(v) == 2:
                    out[i] = v
            return out
    return None


def _source_sizes(spec: str, ids: list[str], need: np.ndarray) -> np.ndarray | None:
    """Image sizes read from the headers of the run's source for the rows in ``need`` (poisoned images only)."""
    from PIL import Image, UnidentifiedImageError

    from poisonscan.data.sources import open_source
    from poisonscan.data.sources.base import DECODE_FORMATS

    try:
        source = open_source(spec)
    except (UsageError, OSError):
        return None
    position = {sid: i for i, sid in enumerate(source.ids)}
    out = np.full((len(ids), 2), np.nan)
    for row in np.flatnonzero(need):
        i = position.get(ids[row])
        if i is None:
            continue
        try:
            with Image.open(io.BytesIO(source.read_members(i)[source.image_ext(i)]), formats=DECODE_FORMATS) as im:
                out[row] = im.size
        except (UsageError, OSError, KeyError, UnidentifiedImageError, Image.DecompressionBombError):
            continue
    return out


def _frame_truth_boxes(truth: GroundTruth, run: DetectRunScores, rows: np.ndarray,
                       warnings: list[str]) -> tuple[np.ndarray, str]:
    """True boxes of the truth rows ``rows`` in the run's ``S x S`` frame and how they were mapped."""
    n = rows.size
    out = np.full((n, 4), np.nan)
    boxes = truth.boxes[rows]
    has_box = ~np.isnan(boxes).any(1)
    if not has_box.any():
        return out, "no trigger boxes in the ground truth"
    size = run.size
    if size is None:
        warnings.append("the run records no image size (store/store.json 'size'): trigger localisation skipped")
        return out, "unavailable"
    ids = [truth.ids[r] for r in rows]
    methods: list[str] = []
    todo = has_box.copy()
    whole = todo & np.isin([truth.attacks[r] for r in rows], WHOLE_IMAGE_ATTACKS) & (boxes[:, :2] == 0).all(1)
    if whole.any():  # the box is the whole poisoned image: it is the full frame
        out[whole] = map_boxes_to_frame(boxes[whole], boxes[whole, 2:], size)
        todo &= ~whole
        methods.append("whole-image trigger")
    if truth.frame_boxes is not None and truth.frame_size is not None:
        fb, fs = truth.frame_boxes[rows], truth.frame_size[rows]
        ok = todo & ~np.isnan(fb).any(1) & (fs > 0)
        out[ok] = fb[ok] * (size / fs[ok])[:, None]
        todo &= ~ok
        if ok.any():
            methods.append("frame boxes from the ground truth")
    for label, sizes in (("image size from the ground truth", truth.image_sizes[rows]),
                         ("image size from the run's store", _store_sizes(run.store_meta, ids))):
        if not todo.any() or sizes is None:
            continue
        ok = todo & ~np.isnan(sizes).any(1)
        if ok.any():
            out[ok] = map_boxes_to_frame(boxes[ok], sizes[ok], size)
            todo &= ~ok
            methods.append(label)
    spec = run.summary.get("source", {}).get("spec")
    if todo.any() and spec:
        sizes = _source_sizes(str(spec), ids, todo)
        if sizes is not None:
            ok = todo & ~np.isnan(sizes).any(1)
            out[ok] = map_boxes_to_frame(boxes[ok], sizes[ok], size)
            todo &= ~ok
            if ok.any():
                methods.append("image size read from the source")
    if todo.any():
        fits = todo & (boxes[:, 0] + boxes[:, 2] <= size) & (boxes[:, 1] + boxes[:, 3] <= size)
        out[fits] = boxes[fits]
        warnings.append(f"{int(todo.sum())} trigger box(es) without an image size: "
                        f"{int(fits.sum())} that fit assumed to be in the {size}x{size} frame already, "
                        f"{int((todo & ~fits).sum())} left out of localisation metrics")
        if fits.any():
            methods.append("assumed already in the frame")
    return out, "; ".join(methods) or "unavailable"


# ----------------------------------------------------------------------------------------------- evaluation
def _optional_metrics(y: np.ndarray, scores: np.ndarray | None, fprs: Sequence[float]) -> dict[str, Any] | None:
    return None if scores is None else _score_metrics(y, scores, fprs)


def _lowest_fill(scores: np.ndarray) -> np.ndarray:
    """Scores with NaN (unscored) replaced below the lowest real score."""
    s = scores.astype(np.float64).copy()
    finite = s[~np.isnan(s)]
    s[np.isnan(s)] = (finite.min() - 1.0) if finite.size else 0.0
    return s


def _score_metrics(y: np.ndarray, scores: np.ndarray, fprs: Sequence[float]) -> dict[str, Any] | None:
    if np.isnan(scores).all():
        return None
    s = _lowest_fill(scores)
    k = int(y.sum())
    return {
        "auroc": M.auroc(y, s),
        "auprc": M.average_precision(y, s),
        "tpr_at_fpr": {f"{f:g}": M.tpr_at_fpr(y, s, f) for f in fprs},
        "precision_at_k": M.precision_at_k(y, s, k) if k else None,
        "k": k,
        "scored": int((~np.isnan(scores)).sum()),
    }


def _retrieval_order(run: DetectRunScores) -> np.ndarray:
    """Rows of the scored samples in retrieval order: the detector's top-k ranks first, then by poison score
    (descending), then by row."""
    rows = np.flatnonzero(~np.isnan(run.poison_score) & ~np.isnan(run.boxes).any(1))
    rank = np.where(np.isnan(run.top_k_rank[rows]), np.inf, run.top_k_rank[rows])
    order = np.lexsort((rows, -run.poison_score[rows], rank))
    return rows[order]


def _window_quality(windows: np.ndarray, true_boxes: np.ndarray) -> dict[str, Any]:
    """Localisation over scored poisoned images: overlap share, mean IoU and mean catch rate."""
    ok = ~np.isnan(true_boxes).any(1) & ~np.isnan(windows).any(1)
    if not ok.any():
        return {"n": 0, "overlap": None, "mean_iou": None, "catch_rate": None}
    w, t = windows[ok], true_boxes[ok]
    return {"n": int(ok.sum()), "overlap": float((M.box_intersection(w, t) > 0).mean()),
            "mean_iou": float(M.box_iou(w, t).mean()), "catch_rate": float(M.box_catch_rate(t, w).mean())}


def _align(run: DetectRunScores, truth: GroundTruth, warnings: list[str]) -> np.ndarray:
    """Truth row of every run row (``-1`` for run rows absent from a poisons-only truth)."""
    t_index = truth.index()
    known = set(run.ids) | set(run.unreadable)
    absent = [sid for sid in truth.ids if sid not in known]
    if absent:
        shown = ", ".join(repr(a) for a in absent[:3])
        raise UsageError(f"the ground truth names {len(absent)} sample(s) absent from the run {run.path} "
                         f"(e.g. {shown}): was the run made on this data set?")
    truth_rows = np.array([t_index.get(sid, -1) for sid in run.ids], dtype=np.int64)
    missing = int((truth_rows < 0).sum())
    if missing:
        if (~truth.poisoned).any():
            example = run.ids[int(np.flatnonzero(truth_rows < 0)[0])]
            raise UsageError(f"{missing} sample(s) of the run are not in the ground truth {truth.path} "
                             f"(e.g. {example!r}): was the run made on this data set?")
        warnings.append(f"the ground truth lists poisons only: {missing} other run samples taken as clean")
    return truth_rows


def evaluate_detection(run: DetectRunScores, truth: GroundTruth, topk: Sequence[int] = DEFAULT_TOPK,
                       fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """Every detection metric of ``run`` against ``truth`` (see docs/commands/eval.md); JSON-ready dict.

    Raises ``UsageError`` when the truth names samples absent from the run or the run has no scores.
    """
    warnings: list[str] = []
    truth_rows = _align(run, truth, warnings)
    has_truth = truth_rows >= 0
    y = np.zeros(len(run.ids), dtype=bool)
    y[has_truth] = truth.poisoned[truth_rows[has_truth]]
    target = np.array([truth.targets[r] if r >= 0 else "" for r in truth_rows], dtype=object)
    true_box = np.full((len(run.ids), 4), np.nan)
    mapping = "no trigger boxes in the ground truth"
    if has_truth.any():
        true_box[has_truth], mapping = _frame_truth_boxes(truth, run, truth_rows[has_truth], warnings)
    t_index = truth.index()
    unreadable = set(run.unreadable) & set(t_index)
    unreadable_poisoned = sum(bool(truth.poisoned[t_index[u]]) for u in unreadable)
    if unreadable:
        warnings.append(f"{len(unreadable)} sample(s) were unreadable in the run and are left out "
                        f"({unreadable_poisoned} of them poisoned)")
    if not y.any():
        warnings.append("the ground truth holds no poisoned sample of this run: recall and rankings are undefined")

    order = _retrieval_order(run)
    result: dict[str, Any] = {
        "command": "eval detection",
        "run_dir": str(run.path),
        "truth": str(truth.path),
        "method": run.summary.get("method"),
        "image_size": run.size,
        "counts": {
            "samples": int(len(run.ids)), "poisoned": int(y.sum()), "clean": int((~y).sum()),
            "removed": int(run.removed.sum()), "scored": int((~np.isnan(run.poison_score)).sum()),
            "scored_poisoned": int((y & ~np.isnan(run.poison_score)).sum()),
            "unreadable": len(unreadable), "unreadable_poisoned": int(unreadable_poisoned),
        },
        "removal": M.precision_recall_f1(y, run.removed),
        "scores": {"poison_score": _score_metrics(y, run.poison_score, fprs),
                   "classifier_prob": _score_metrics(y, run.classifier_prob, fprs),
                   "removal_score": _optional_metrics(y, run.removal_score, fprs),
                   "picture_match": _optional_metrics(y, run.picture_match, fprs)},
        "triggers": {
            "box_mapping": mapping,
            "candidates": int(order.size),
            "topk": {str(k): v for k, v in M.topk_trigger_accuracy(run.boxes[order], true_box[order], topk).items()},
            "scored_poisoned": _window_quality(run.boxes[y], true_box[y]),
        },
        "per_target": [],
        "warnings": warnings,
    }
    for t in sorted({t for t in target[y] if t}):
        result["per_target"].append(_per_target(run, y, target, t, true_box, order, topk, fprs, truth))
    return result


def _per_target(run: DetectRunScores, y: np.ndarray, target: np.ndarray, t: str, true_box: np.ndarray,
                order: np.ndarray, topk: Sequence[int], fprs: Sequence[float], truth: GroundTruth) -> dict[str, Any]:
    """Metrics of the poisons of target ``t`` against the clean samples (other targets' poisons left out)."""
    mine = y & (target == t)
    sel = mine | ~y
    ymine = mine[sel]
    box_t = np.where(mine[:, None], true_box, np.nan)
    rows = [i for i, p in enumerate(truth.poisoned) if p and truth.targets[i] == t]
    triggers = sorted({truth.triggers[i] for i in rows} - {""})
    attacks = sorted({truth.attacks[i] for i in rows} - {""})
    names = sorted({truth.target_names[i] for i in rows} - {""})
    return {
        "target": t,
        "target_name": ",".join(names) or t,
        "trigger": ",".join(triggers),
        "attack": ",".join(attacks),
        "poisoned": int(mine.sum()),
        "removed_poisoned": int((mine & run.removed).sum()),
        "recall": float((mine & run.removed).sum() / max(mine.sum(), 1)),
        "poison_score": _score_metrics(ymine, run.poison_score[sel], fprs),
        "classifier_prob": _score_metrics(ymine, run.classifier_prob[sel], fprs),
        "removal_score": _optional_metrics(ymine, None if run.removal_score is None else run.removal_score[sel], fprs),
        "picture_match": _optional_metrics(ymine, None if run.picture_match is None else run.picture_match[sel], fprs),
        "topk": {str(k): v for k, v in M.topk_trigger_accuracy(run.boxes[order], box_t[order], topk).items()},
        "scored_poisoned": _window_quality(run.boxes[mine], true_box[mine]),
    }


# ----------------------------------------------------------------------------------------------- outputs
def flatten_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{scope, metric, value}`` of every number in ``result`` (scope ``all`` or ``target=<t>``) for CSV."""
    rows: list[dict[str, Any]] = []

    def walk(obj: Any, prefix: str, scope: str) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key), scope)
        elif isinstance(obj, (bool, np.bool_)):
            rows.append({"scope": scope, "metric": prefix, "value": int(obj)})
        elif obj is None or isinstance(obj, (int, float, np.integer, np.floating)):
            rows.append({"scope": scope, "metric": prefix, "value": "" if obj is None else obj})

    for key in ("counts", "removal", "scores", "triggers"):
        walk(result.get(key, {}), key, "all")
    for entry in result.get("per_target", []):
        walk({k: v for k, v in entry.items() if k not in ("target", "target_name", "trigger", "attack")}, "",
             f"target={entry['target']}")
    return rows


def detection_plots(run: DetectRunScores, truth: GroundTruth) -> dict[str, bytes]:
    """PNG charts (file name -> bytes): precision-recall and ROC curves, score distributions poisoned vs clean."""
    truth_rows = _align(run, truth, [])
    y = np.zeros(len(run.ids), dtype=bool)
    ok = truth_rows >= 0
    y[ok] = truth.poisoned[truth_rows[ok]]
    named = [(name, file, s) for name, file, s in (
        ("poison score", "poison_score_hist.png", run.poison_score),
        ("classifier prob.", "classifier_prob_hist.png", run.classifier_prob),
        ("removal score", "removal_score_hist.png", run.removal_score),
        ("picture match", "picture_match_hist.png", run.picture_match)) if s is not None and not np.isnan(s).all()]
    out: dict[str, bytes] = {}
    if y.any() and (~y).any() and named:
        pr, roc = [], []
        for name, _, s in named:
            filled = _lowest_fill(s)
            precision, recall, _ = M.precision_recall_curve(y, filled)
            pr.append((f"{name} (AP {M.average_precision(y, filled):.3f})", np.r_[0.0, recall],
                       np.r_[precision[0], precision]))
            fpr, tpr, _ = M.roc_curve(y, filled)
            roc.append((f"{name} (AUROC {M.auroc(y, filled):.3f})", fpr, tpr))
        out["pr_curve.png"] = line_chart(pr, title="Precision-recall of the per-sample scores", xlabel="recall",
                                         ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), step=True)
        out["roc_curve.png"] = line_chart(roc, title="ROC of the per-sample scores", xlabel="false-positive rate",
                                          ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02))
    for name, file, s in named:
        scored = ~np.isnan(s)
        if not scored.any():
            continue
        out[file] = histogram_chart([("clean", s[scored & ~y]), ("poisoned", s[scored & y])],
                                    title=f"Distribution of the {name} (scored samples)", xlabel=name)
    return out
