"""PNG gallery of a detect run: top-k trigger crops, attention overlays, removed images per cluster (PIL only).

Files (under the run directory):

- ``gallery/topk.png``: the top-k candidate trigger crops, ranked, with rank and poison score under each.
- ``gallery/top/rank_XX.png``: per top image, side by side: the image, its attention map as a heat overlay, and the
  image with the chosen window drawn as a rectangle; a caption with rank, score, cluster, box and id.
- ``gallery/triggers/rank_XX.png``: the raw candidate trigger crops at the model's resolution.
- ``gallery/removed_by_cluster.png``: per cluster with removed images, samples of removed (red frame) and kept
  (green frame) images of the same cluster.

Small images are upscaled with NEAREST by whole factors so pixels (and small triggers) stay crisp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from poisonscan.report.plots import draw_text, load_font, png_bytes
from poisonscan.report.summary import printable
from poisonscan.runs import RunDir

__all__ = ["write_gallery", "colormap", "heat_overlay", "crop_box", "rank_name", "ranking"]

Box = tuple[int, int, int, int]

#: colour maps as (position, RGB) anchors, interpolated linearly per channel
COLORMAPS: dict[str, np.ndarray] = {
    "jet": np.array([[0.0, 0, 0, 128], [0.11, 0, 0, 255], [0.125, 0, 0, 255], [0.34, 0, 216, 255],
                     [0.375, 0, 255, 255], [0.625, 255, 255, 0], [0.875, 255, 0, 0], [1.0, 128, 0, 0]],
                    dtype=np.float64),
    "inferno": np.array([[0.0, 0, 0, 4], [0.13, 31, 12, 72], [0.25, 85, 15, 109], [0.38, 136, 34, 106],
                         [0.5, 186, 54, 85], [0.63, 227, 89, 51], [0.75, 249, 140, 10], [0.88, 249, 201, 50],
                         [1.0, 252, 255, 164]], dtype=np.float64),
}
REMOVED_COLOUR = (220, 40, 60)
KEPT_COLOUR = (40, 160, 80)
BOX_COLOUR = (0, 255, 0)
BACKGROUND = (255, 255, 255)


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Map ``values`` in [0, 1] (any shape) to uint8 RGB (shape + (3,)); NaN counts as 0, values are clipped."""
    anchors = COLORMAPS[name]
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(v, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def normalise_map(attention: np.ndarray, size: int) -> np.ndarray:
    """Attention map as float32 ``size x size`` scaled to [0, 1] (min-max; a flat map becomes zeros)."""
    a = np.nan_to_num(np.asarray(attention, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"attention map must be 2-D, got shape {a.shape}")
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def heat_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.5, name: str = "jet") -> np.ndarray:
    """Blend the colour-mapped ``attention`` (H x W) over ``image`` (H x W x 3 uint8); returns uint8 H x W x 3."""
    heat = colormap(normalise_map(attention, image.shape[0]), name).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def clip_box(box: Sequence[Any], size: int) -> Box | None:
    """``(x, y, w, h)`` as ints inside a ``size x size`` image, or None when missing or empty."""
    try:
        x, y, w, h = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        return None
    x0, y0 = max(0, min(x, size)), max(0, min(y, size))
    x1, y1 = max(0, min(x + w, size)), max(0, min(y + h, size))
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def crop_box(image: np.ndarray, box: Box) -> np.ndarray:
    """The ``(x, y, w, h)`` window of an H x W x 3 image."""
    x, y, w, h = box
    return image[y:y + h, x:x + w]


def rank_name(rank: int, total: int) -> str:
    """``rank_01`` ... with at least two digits (more when there are 100+ ranks)."""
    return f"rank_{rank:0{max(2, len(str(total)))}d}"


def _hwc(images_u8: torch.Tensor | np.ndarray, i: int) -> np.ndarray:
    item = images_u8[i]
    arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    elif arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] == 3:
        arr = arr.transpose(1, 2, 0)  # 3 x 3 x 3 is ambiguous: the store is N x 3 x S x S
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def _upscale(arr: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(arr, "RGB")
    return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _thumb(arr: np.ndarray, side: int) -> Image.Image:
    """Fit ``arr`` into ``side x side``: whole-factor NEAREST upscale when small, area downscale when large."""
    h, w = arr.shape[:2]
    if max(h, w) <= side:
        return _upscale(arr, max(1, side // max(h, w)))
    f = side / max(h, w)
    return Image.fromarray(arr, "RGB").resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX)


def ranking(summary: Mapping[str, Any], scores: Mapping[int, int], boxes: Mapping[int, Any],
            cluster_labels: np.ndarray | None = None, k: int | None = None) -> list[dict[str, Any]]:
    """The ranked top-k entries: ``summary["top_k"]`` when present, else the ``k`` best ``scores``
    (ties by index); the box and score fall back to ``boxes`` / ``scores`` when an entry lacks them."""
    top = [dict(e) for e in summary.get("top_k") or []]
    if not top and scores:
        k = k or 20
        order = sorted(scores, key=lambda i: (-scores[i], i))[:k]
        top = [{"rank": r + 1, "index": int(i)} for r, i in enumerate(order)]
    for r, e in enumerate(top):
        i = int(e["index"])
        e.setdefault("rank", r + 1)
        if e.get("box") is None and i in boxes:
            e["box"] = list(boxes[i])
        if e.get("poison_score") is None and i in scores:
            e["poison_score"] = int(scores[i])
        if e.get("cluster") is None and cluster_labels is not None and 0 <= i < len(cluster_labels):
            e["cluster"] = int(cluster_labels[i])
        e.setdefault("id", str(i))
    return sorted(top, key=lambda e: int(e["rank"]))


def _message_panel(text: str, width: int = 480, height: int = 80) -> Image.Image:
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw_text(draw, (width / 2, height / 2), text, load_font(14), (90, 90, 90), anchor="mm")
    return img


def topk_grid(crops: Sequence[np.ndarray], top: Sequence[Mapping[str, Any]], min_cell: int = 96,
              columns: int = 10) -> Image.Image:
    """Grid of ranked trigger crops, each upscaled (NEAREST) to a common cell with ``#rank`` and score under it."""
    if not crops:
        return _message_panel("no candidate triggers (no image was scored)")
    side = max(max(c.shape[0], c.shape[1]) for c in crops)
    scale = max(1, math.ceil(min_cell / side))
    cell = side * scale
    font = load_font(12)
    pad, label_h = 8, 34
    cols = min(columns, len(crops))
    rows = math.ceil(len(crops) / cols)
    grid = Image.new("RGB", (pad + cols * (cell + pad), pad + rows * (cell + label_h + pad)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for n, (crop, entry) in enumerate(zip(crops, top)):
        r, c = divmod(n, cols)
        x = pad + c * (cell + pad)
        y = pad + r * (cell + label_h + pad)
        tile = _upscale(crop, scale)
        grid.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
        draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(180, 180, 180))
        draw_text(draw, (x + cell / 2, y + cell + 3), f"#{entry['rank']}", font, (0, 0, 0), anchor="mt",
                  max_width=cell)
        draw_text(draw, (x + cell / 2, y + cell + 18), f"score {entry.get('poison_score', '-')}", font,
                  (90, 90, 90), anchor="mt", max_width=cell)
    return grid


def attention_panel(image: np.ndarray, attention: np.ndarray | None, box: Box | None, entry: Mapping[str, Any],
                    min_side: int = 224) -> Image.Image:
    """Image | heat overlay of the attention map | image with the window rectangle, plus a caption."""
    size = image.shape[0]
    scale = max(1, math.ceil(min_side / size))
    side = size * scale
    pad, cap_h = 8, 40
    font, small = load_font(13), load_font(11)
    panel = Image.new("RGB", (pad + 3 * (side + pad), pad + 16 + side + cap_h), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    titles = ("image", "attention", "candidate window")
    for p, title in enumerate(titles):
        draw_text(draw, (pad + p * (side + pad) + side / 2, pad), title, small, (90, 90, 90), anchor="mt")
    y = pad + 16
    panel.paste(_upscale(image, scale), (pad, y))
    if attention is not None:
        panel.paste(_upscale(heat_overlay(image, attention), scale), (pad + side + pad, y))
    else:
        x = pad + side + pad
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(235, 235, 235))
        draw_text(draw, (x + side / 2, y + side / 2), "no attention map", small, (90, 90, 90), anchor="mm")
    x = pad + 2 * (side + pad)
    panel.paste(_upscale(image, scale), (x, y))
    if box is not None:
        bx, by, bw, bh = box
        lw = max(2, scale)
        draw.rectangle((x + bx * scale, y + by * scale, x + (bx + bw) * scale - 1, y + (by + bh) * scale - 1),
                       outline=BOX_COLOUR, width=lw)
    box_text = f"({', '.join(str(v) for v in box)})" if box is not None else "-"
    line1 = (f"rank {entry.get('rank')}   score {entry.get('poison_score', '-')}   "
             f"cluster {entry.get('cluster', '-')}   box {box_text}")
    draw_text(draw, (pad, y + side + 6), line1, font, (0, 0, 0), max_width=panel.width - 2 * pad)
    draw_text(draw, (pad, y + side + 23), printable(entry.get("id", "")), small, (70, 70, 70),
              max_width=panel.width - 2 * pad)
    return panel


def removed_by_cluster(images_u8: torch.Tensor | np.ndarray, removed: np.ndarray, cluster_labels: np.ndarray,
                       scores: Mapping[int, int], max_clusters: int = 10, per_cluster: int = 6, kept: int = 3,
                       thumb: int = 80, seed: int = 0) -> Image.Image:
    """One row per cluster with removed images (most removed first): up to ``per_cluster`` removed images (highest
    poison score first, then by index; red frame) and ``kept`` images kept from the same cluster (green frame)."""
    removed = np.asarray(removed, dtype=bool).reshape(-1)
    labels = np.asarray(cluster_labels).reshape(-1)
    if not removed.any():
        return _message_panel("no images were removed")
    clusters, counts = np.unique(labels[removed], return_counts=True)
    order = np.lexsort((clusters, -counts))[:max_clusters]
    rng = np.random.default_rng(seed)
    font, small = load_font(13), load_font(11)
    pad, label_w, gap, frame = 8, 150, 24, 3
    cell = thumb + 2 * frame
    width = pad + label_w + per_cluster * (cell + 4) + gap + kept * (cell + 4) + pad
    header_h = 24
    height = header_h + pad + len(order) * (cell + pad) + pad
    if len(clusters) > len(order):
        height += 18
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.rectangle((pad, 8, pad + 10, 18), fill=REMOVED_COLOUR)
    draw_text(draw, (pad + 14, 13), "removed", small, (0, 0, 0), anchor="lm")
    draw.rectangle((pad + 80, 8, pad + 90, 18), fill=KEPT_COLOUR)
    draw_text(draw, (pad + 94, 13), "kept (same cluster, for contrast)", small, (0, 0, 0), anchor="lm")
    for row, ci in enumerate(order):
        c = clusters[ci]
        in_c = labels == c
        rem_idx = np.flatnonzero(in_c & removed)
        kept_idx = np.flatnonzero(in_c & ~removed)
        rem_sorted = sorted(rem_idx.tolist(), key=lambda i: (-scores.get(i, -1), i))[:per_cluster]
        kept_pick = np.sort(rng.choice(kept_idx, size=min(kept, kept_idx.size), replace=False)).tolist() \
            if kept_idx.size else []
        y = header_h + pad + row * (cell + pad)
        draw_text(draw, (pad, y + 4), f"cluster {printable(c)}", font, (0, 0, 0), max_width=label_w - 6)
        draw_text(draw, (pad, y + 22), f"removed {rem_idx.size:,} of {int(in_c.sum()):,}", small, (90, 90, 90),
                  max_width=label_w - 6)
        x = pad + label_w
        for idxs, colour, start in ((rem_sorted, REMOVED_COLOUR, x),
                                    (kept_pick, KEPT_COLOUR, x + per_cluster * (cell + 4) + gap)):
            for n, i in enumerate(idxs):
                cx = start + n * (cell + 4)
                t = _thumb(_hwc(images_u8, int(i)), thumb)
                tx, ty = cx + frame + (thumb - t.width) // 2, y + frame + (thumb - t.height) // 2
                draw.rectangle((tx - frame, ty - frame, tx + t.width + frame - 1, ty + t.height + frame - 1),
                               fill=colour)
                img.paste(t, (tx, ty))
        if not kept_pick:
            cx = x + per_cluster * (cell + 4) + gap
            draw_text(draw, (cx, y + cell / 2), "(no kept images)", small, (120, 120, 120), anchor="lm")
    if len(clusters) > len(order):
        draw_text(draw, (pad, height - 16), f"{len(clusters) - len(order)} more clusters with removed images "
                  "(see scores.csv)", small, (90, 90, 90))
    return img


def _prune(run: RunDir, folder: str, keep: set[str]) -> None:
    """Delete ``rank_*.png`` files of an earlier run in ``folder`` that this run does not write."""
    d = run.file(folder)
    if d.is_dir():
        for p in d.glob("rank_*.png"):
            if f"{folder}/{p.name}" not in keep:
                p.unlink(missing_ok=True)


def write_gallery(run: RunDir | Path | str, images_u8: torch.Tensor | np.ndarray, summary: Mapping[str, Any],
                  attention: Mapping[int, np.ndarray], boxes: Mapping[int, Any], removed: np.ndarray,
                  cluster_labels: np.ndarray, scores: Mapping[int, int]) -> dict[str, Path]:
    """Write the PNG gallery of a detect run (see the module docstring) and return ``{relative name: path}``.

    ``images_u8`` is the store (N x 3 x S x S uint8, tensor or array, memory-mapped is fine: only the shown rows
    are read); ``attention``, ``boxes`` and ``scores`` are keyed by sample index (scored images); ``removed`` and
    ``cluster_labels`` have one entry per sample. Ranks come from ``summary["top_k"]``.
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    n = len(images_u8)
    size = int(images_u8.shape[-1])
    removed = np.asarray(removed, dtype=bool).reshape(-1)
    cluster_labels = np.asarray(cluster_labels).reshape(-1)
    if removed.size != n or cluster_labels.size != n:
        raise ValueError(f"removed ({removed.size}) and cluster_labels ({cluster_labels.size}) need one entry per "
                         f"image ({n})")
    top = [e for e in ranking(summary, scores, boxes, cluster_labels) if 0 <= int(e["index"]) < n]
    written: dict[str, Path] = {}
    crops, shown = [], []
    for entry in top:
        i = int(entry["index"])
        image = _hwc(images_u8, i)
        box = clip_box(entry["box"], size) if entry.get("box") is not None else None
        name = rank_name(int(entry["rank"]), len(top))
        panel = attention_panel(image, attention.get(i), box, entry)
        written[f"gallery/top/{name}.png"] = run.write_bytes(f"gallery/top/{name}.png", png_bytes(panel))
        if box is not None:
            crop = crop_box(image, box)
            written[f"gallery/triggers/{name}.png"] = run.write_bytes(
                f"gallery/triggers/{name}.png", png_bytes(Image.fromarray(np.ascontiguousarray(crop), "RGB")))
            crops.append(crop)
            shown.append(entry)
    written["gallery/topk.png"] = run.write_bytes("gallery/topk.png", png_bytes(topk_grid(crops, shown)))
    written["gallery/removed_by_cluster.png"] = run.write_bytes(
        "gallery/removed_by_cluster.png", png_bytes(removed_by_cluster(images_u8, removed, cluster_labels, scores)))
    for folder in ("gallery/top", "gallery/triggers"):
        _prune(run, folder, set(written))
    return written
