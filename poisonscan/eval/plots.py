"""Small PNG charts drawn with PIL (no matplotlib): line charts (PR / ROC curves) and overlaid histograms.

Each function returns PNG bytes; the caller writes them atomically (``runs.atomic_write_bytes``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["line_chart", "histogram_chart", "nice_ticks"]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
_W, _H = 720, 480
_MARGIN = (78, 44, 24, 62)  # left, top, right, bottom


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps 1, 2, 2.5 or 5 times a power of ten)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3f}".rstrip("0").rstrip(".")


@dataclass
class _Axes:
    img: Image.Image
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def __post_init__(self) -> None:
        self.draw = ImageDraw.Draw(self.img)

    @property
    def box(self) -> tuple[int, int, int, int]:
        left, top, right, bottom = _MARGIN
        return left, top, _W - right, _H - bottom

    def px(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        (a, b), (c, d) = self.xlim, self.ylim
        fx = (x - a) / (b - a) if b > a else 0.5
        fy = (y - c) / (d - c) if d > c else 0.5
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, title: str, xlabel: str, ylabel: str) -> None:
        d, small, big = self.draw, _font(12), _font(15)
        x0, y0, x1, y1 = self.box
        for t in nice_ticks(*self.xlim):
            x, _ = self.px(t, self.ylim[0])
            d.line([(x, y0), (x, y1)], fill=(232, 232, 232))
            d.line([(x, y1), (x, y1 + 5)], fill="black")
            d.text((x, y1 + 8), _fmt(t), fill="black", font=small, anchor="mt")
        for t in nice_ticks(*self.ylim):
            _, y = self.px(self.xlim[0], t)
            d.line([(x0, y), (x1, y)], fill=(232, 232, 232))
            d.line([(x0 - 5, y), (x0, y)], fill="black")
            d.text((x0 - 8, y), _fmt(t), fill="black", font=small, anchor="rm")
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text(((x0 + x1) / 2, 14), title, fill="black", font=big, anchor="mt")
        d.text(((x0 + x1) / 2, _H - 18), xlabel, fill="black", font=small, anchor="mb")
        width = int(small.getlength(ylabel)) + 8 if hasattr(small, "getlength") else 7 * len(ylabel) + 8
        label = Image.new("L", (width, 18), 0)
        ImageDraw.Draw(label).text((4, 2), ylabel, fill=255, font=small)
        mask = label.rotate(90, expand=True)
        self.img.paste((0, 0, 0), (8, int((y0 + y1 - mask.height) / 2)), mask)

    def legend(self, labels: Sequence[str]) -> None:
        d, small = self.draw, _font(12)
        x0, y0, x1, _ = self.box
        widths = [small.getlength(s) if hasattr(small, "getlength") else 7 * len(s) for s in labels]
        w = int(max(widths, default=0)) + 40
        lx, ly = x1 - w - 8, y0 + 8
        d.rectangle([lx, ly, lx + w, ly + 18 * len(labels) + 6], fill="white", outline=(160, 160, 160))
        for i, s in enumerate(labels):
            cy = ly + 12 + 18 * i
            d.line([(lx + 6, cy), (lx + 26, cy)], fill=PALETTE[i % len(PALETTE)], width=3)
            d.text((lx + 32, cy), s, fill="black", font=small, anchor="lm")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _limits(values: list[np.ndarray], pad: float = 0.0) -> tuple[float, float]:
    finite = [v[np.isfinite(v)] for v in values if v.size]
    finite = [v for v in finite if v.size]
    if not finite:
        return 0.0, 1.0
    lo, hi = float(min(v.min() for v in finite)), float(max(v.max() for v in finite))
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    return lo - pad * span, hi + pad * span


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
               ylabel: str, xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
               step: bool = False) -> bytes:
    """One or more labelled lines ``(label, xs, ys)``; with ``step`` each point's ``y`` holds on the interval from
    the previous ``x`` to its own (a precision-recall curve whose area is the average precision)."""
    img = Image.new("RGB", (_W, _H), "white")
    xs_all = [np.asarray(s[1], dtype=np.float64) for s in series]
    ys_all = [np.asarray(s[2], dtype=np.float64) for s in series]
    ax = _Axes(img, xlim or _limits(xs_all), ylim or _limits(ys_all, 0.05))
    d = ax.draw
    ax.frame(title, xlabel, ylabel)
    for i, (xs, ys) in enumerate(zip(xs_all, ys_all)):
        pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if step and len(pts) > 1:
            stepped = [pts[0]]
            for (xa, _), (xb, yb) in zip(pts, pts[1:]):
                stepped += [(xa, yb), (xb, yb)]
            pts = stepped
        pix = [ax.px(x, y) for x, y in pts]
        colour = PALETTE[i % len(PALETTE)]
        if len(pix) > 1:
            d.line(pix, fill=colour, width=2, joint="curve")
        elif pix:
            x, y = pix[0]
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    ax.legend([s[0] for s in series])
    return _png(img)


def histogram_chart(groups: Sequence[tuple[str, Sequence[float]]], *, title: str, xlabel: str,
                    ylabel: str = "share of the group", bins: int = 30, density: bool = True) -> bytes:
    """Overlaid step histograms of several groups on shared bins (share of each group per bin by default)."""
    img = Image.new("RGB", (_W, _H), "white")
    values = [np.asarray(g[1], dtype=np.float64) for g in groups]
    values = [v[np.isfinite(v)] for v in values]
    lo, hi = _limits(values)
    edges = np.linspace(lo, hi, bins + 1)
    heights = []
    for v in values:
        h, _ = np.histogram(v, bins=edges)
        heights.append(h / max(v.size, 1) if density else h.astype(np.float64))
    top = max((float(h.max()) for h in heights if h.size), default=1.0) or 1.0
    ax = _Axes(img, (lo, hi), (0.0, top * 1.08))
    d = ax.draw
    ax.frame(title, xlabel, ylabel)
    for i, h in enumerate(heights):
        colour = PALETTE[i % len(PALETTE)]
        pts = [ax.px(edges[0], 0.0)]
        for j, hv in enumerate(h):
            pts += [ax.px(edges[j], hv), ax.px(edges[j + 1], hv)]
        pts.append(ax.px(edges[-1], 0.0))
        d.line(pts, fill=colour, width=2)
    ax.legend([f"{g[0]} (n={v.size})" for g, v in zip(groups, values)])
    return _png(img)
