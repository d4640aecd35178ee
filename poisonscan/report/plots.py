"""Plots drawn with PIL only (no matplotlib): score histograms, plus the small drawing helpers the gallery shares."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from poisonscan.runs import atomic_write_bytes

__all__ = ["score_histogram_png", "score_histogram_image", "png_bytes", "load_font", "draw_text", "nice_ticks"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
SERIES_COLOURS = ((70, 130, 180), (220, 40, 60))  # steel blue (clean / kept), crimson (poisoned / removed)


@lru_cache(maxsize=8)
def load_font(size: int = 12) -> Font:
    """Pillow's bundled font at ``size`` px (FreeType when available, else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    """Width and height of ``text`` drawn with ``font``."""
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    except UnicodeError:
        left, top, right, bottom = draw.textbbox((0, 0), _ascii(text), font=font)
    return int(right - left), int(bottom - top)


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int) -> str:
    """``text`` shortened in the middle with an ellipsis so it fits ``max_width`` px."""
    if text_size(draw, text, font)[0] <= max_width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest kept length that fits
        mid = (lo + hi + 1) // 2
        cand = text[: (mid + 1) // 2] + "..." + text[len(text) - mid // 2:]
        if text_size(draw, cand, font)[0] <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[: (lo + 1) // 2] + "..." + text[len(text) - lo // 2:] if lo else "..."


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Font,
              fill: tuple[int, ...] = (0, 0, 0), anchor: str | None = None, max_width: int | None = None) -> None:
    """Draw ``text`` (shortened to ``max_width`` px); characters the font cannot encode are backslash-escaped."""
    if max_width is not None:
        text = fit_text(draw, text, font, max_width)
    try:
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
    except UnicodeError:
        draw.text(xy, _ascii(text), font=font, fill=fill, anchor=anchor)


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick positions covering ``[lo, hi]`` (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}"


def _bin_edges(values: np.ndarray, bins: int | None, value_range: tuple[float, float] | None) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if value_range is None else map(float, value_range)
    integral = bool(np.all(np.equal(np.mod(values, 1), 0)))
    if bins is None and integral and value_range is None and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5, 1.0)  # one bin per integer score
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5])
    n = bins or int(min(40, max(5, round(math.sqrt(values.size)))))
    return np.linspace(lo, hi, n + 1)


def score_histogram_image(values: Sequence[float] | np.ndarray, flags: Sequence[bool] | np.ndarray | None = None,
                          *, labels: tuple[str, str] = ("clean", "poisoned"), title: str = "Poison scores",
                          xlabel: str = "poison score", bins: int | None = None, threshold: float | None = None,
                          log_y: bool | None = None, value_range: tuple[float, float] | None = None,
                          size: tuple[int, int] = (720, 360)) -> Image.Image:
    """Histogram of ``values`` as a PIL image; with ``flags`` two series (``labels[0]`` False, ``labels[1]`` True).

    Non-finite values (unscored images) are left out. ``log_y=None`` picks a log count axis when the tallest bar is
    over 100x the shortest non-empty one, so a few poisoned images stay visible next to thousands of clean ones.
    ``threshold`` draws a dashed vertical line (e.g. the classifier's decision threshold); ``value_range`` fixes the
    x axis (e.g. ``(0, 1)`` for probabilities; values outside it are left out).
    """
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    flg = None if flags is None else np.asarray(flags, dtype=bool).reshape(-1)
    if flg is not None and flg.shape != vals.shape:
        raise ValueError(f"flags has {flg.size} entries for {vals.size} values")
    keep = np.isfinite(vals)
    if value_range is not None:
        keep &= (vals >= value_range[0]) & (vals <= value_range[1])
    vals = vals[keep]
    flg = None if flg is None else flg[keep]

    width, height = size
    left, right, top, bottom = 64, 20, 48, 52
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = load_font(13), load_font(11)
    draw_text(draw, (left, 10), title, load_font(15), max_width=width - left - right)
    pw, ph = width - left - right, height - top - bottom
    x0, y0, x1, y1 = left, top, left + pw, top + ph
    draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    if vals.size == 0:
        draw_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), "no data", font, (120, 120, 120), anchor="mm")
        return img

    edges = _bin_edges(vals, bins, value_range)
    series = [vals] if flg is None else [vals[~flg], vals[flg]]
    counts = [np.histogram(s, bins=edges)[0] for s in series]
    cmax = max(int(c.max()) for c in counts)
    nonzero = [int(v) for c in counts for v in c if v > 0]
    if log_y is None:
        log_y = bool(nonzero) and cmax / min(nonzero) > 100

    def yscale(c: float) -> float:
        top_val = math.log10(cmax + 1) if log_y else cmax
        v = math.log10(c + 1) if log_y else c
        return y1 - (v / top_val) * (ph - 6) if top_val > 0 else y1

    lo, hi = float(edges[0]), float(edges[-1])

    def xscale(v: float) -> float:
        return x0 + (v - lo) / (hi - lo) * pw

    # y grid and ticks first so the bars stay on top
    yticks = [0] + [10 ** e for e in range(0, int(math.log10(cmax)) + 1)] if log_y \
        else [t for t in nice_ticks(0, cmax, 5) if float(t).is_integer()]
    for t in yticks:
        if t > cmax:
            continue
        y = yscale(float(t))
        draw.line((x0 - 4, y, x0, y), fill=(80, 80, 80))
        draw.line((x0 + 1, y, x1 - 1, y), fill=(235, 235, 235))
        draw_text(draw, (x0 - 6, y), _tick_label(t), small, (60, 60, 60), anchor="rm")
    n_series = len(series)
    for b in range(len(edges) - 1):
        bx0, bx1 = xscale(edges[b]), xscale(edges[b + 1])
        slot = (bx1 - bx0) / n_series
        for s, c in enumerate(counts):
            if c[b] == 0:
                continue
            colour = SERIES_COLOURS[s if n_series > 1 else 0]
            sx0 = bx0 + s * slot + (1 if slot > 3 else 0)
            sx1 = max(sx0 + 1, bx0 + (s + 1) * slot - (1 if slot > 3 else 0))
            draw.rectangle((sx0, yscale(float(c[b])), sx1, y1), fill=colour)

    # x ticks at round data values
    for t in nice_ticks(lo, hi) if value_range is not None else nice_ticks(float(vals.min()), float(vals.max())):
        if lo <= t <= hi:
            x = xscale(t)
            draw.line((x, y1, x, y1 + 4), fill=(80, 80, 80))
            draw_text(draw, (x, y1 + 6), _tick_label(t), small, (60, 60, 60), anchor="mt")
    draw_text(draw, ((x0 + x1) / 2, height - 14), xlabel, font, (40, 40, 40), anchor="mm")
    draw_text(draw, (8, top - 16), "count (log)" if log_y else "count", small, (60, 60, 60))

    if threshold is not None and math.isfinite(threshold) and lo <= threshold <= hi:
        x = xscale(threshold)
        for yy in range(int(y0), int(y1), 8):
            draw.line((x, yy, x, min(yy + 4, y1)), fill=(0, 0, 0), width=2)
        draw_text(draw, (x + 4, y0 + 4), f"threshold {threshold:.3g}", small, (0, 0, 0))

    # legend
    entries = [(f"{labels[i]} ({len(series[i]):,})", SERIES_COLOURS[i]) for i in range(n_series)] if n_series > 1 \
        else [(f"n = {len(vals):,}", SERIES_COLOURS[0])]
    lx = x1
    for text, colour in reversed(entries):
        tw, _ = text_size(draw, text, font)
        lx -= tw + 22
        draw.rectangle((lx, 14, lx + 12, 26), fill=colour)
        draw_text(draw, (lx + 16, 20), text, font, (30, 30, 30), anchor="lm")
        lx -= 10
    return img


def score_histogram_png(scores: Sequence[float] | np.ndarray, flags: Sequence[bool] | np.ndarray | None,
                        path: Path | str, **kwargs: Any) -> Path:
    """Write the histogram of ``scores`` (split by ground-truth ``flags`` when given) as a PNG, atomically.

    Keyword arguments go to :func:`score_histogram_image` (``labels``, ``title``, ``xlabel``, ``bins``,
    ``threshold``, ``log_y``, ``value_range``, ``size``).
    """
    return atomic_write_bytes(path, png_bytes(score_histogram_image(scores, flags, **kwargs)))
