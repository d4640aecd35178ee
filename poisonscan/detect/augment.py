"""The poison classifier's batched augmentation, all on the device: random resized crops, top-k windows (or decoys:
windows of other images) pasted at a random size and place, and colour jitter, grayscale and flips."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor



def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def random_resized_crop(x: Tensor, scale: tuple[float, float], g: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Per-image random resized crop of a float batch back to its size (bilinear ``roi_align``)."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, *scale, g, dev) * h * w
    logr = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, dev)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    x0 = torch.rand(n, generator=g, device=dev) * (w - cw)
    y0 = torch.rand(n, generator=g, device=dev) * (h - ch)
    boxes = torch.stack([torch.arange(n, device=dev, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], 1).to(x.dtype)
    return roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def paste_resized(x: Tensor, patches: Tensor, which: Tensor, sides: Tensor, x0: Tensor, y0: Tensor,
                  turns: Tensor | None = None) -> Tensor:
    """Paste ``patches[which[b]]`` resized to ``sides[b]`` px at ``(x0[b], y0[b])`` on image b (float, batched),
    turned by ``turns[b]`` radians about its centre (``None``: upright).

    ``which`` may hold -1 for images left unchanged. One ``grid_sample`` for the whole batch.
    """
    n, _, h, w = x.shape
    dev = x.device
    sel = which.clamp(min=0)
    src = patches[sel].to(x.dtype)
    xs = torch.arange(w, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=dev, dtype=torch.float32) + 0.5
    gx = ((xs[None, :] - x0[:, None]) / sides[:, None] * 2 - 1)[:, None, :].expand(n, h, w)       # n x h x w
    gy = ((ys[None, :] - y0[:, None]) / sides[:, None] * 2 - 1)[:, :, None].expand(n, h, w)
    if turns is not None:
        cos, sin = torch.cos(turns)[:, None, None], torch.sin(turns)[:, None, None]
        gx, gy = cos * gx + sin * gy, cos * gy - sin * gx
    grid = torch.stack([gx, gy], -1)
    pasted = F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    inside = (gx.abs() <= 1) & (gy.abs() <= 1) & (which >= 0)[:, None, None]
    return torch.where(inside[:, None], pasted, x)


def decoy_windows(x: Tensor, side: int, min_side: float, max_side: float, g: torch.Generator) -> Tensor:
    """One square window per image, cut at a random place from another image of the batch (the batch rolled by
    one) with a side in [min_side, max_side) of the image side, resized to ``side`` px: natural content to paste."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    dev = x.device
    size = min(h, w)
    s = _uniform(n, max(1.0, min_side * size), max(1.0, max_side * size), g, dev).clamp(1, size)
    x0 = torch.rand(n, generator=g, device=dev) * (w - s)
    y0 = torch.rand(n, generator=g, device=dev) * (h - s)
    boxes = torch.stack([torch.arange(n, device=dev, dtype=torch.float32), x0, y0, x0 + s, y0 + s], 1)
    return roi_align(x.roll(1, 0), boxes.to(x.dtype), output_size=(side, side), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


def random_paste(x: Tensor, patches: Tensor, prob: float, min_side: float, max_side: float, margin: float,
                 g: torch.Generator, decoy_prob: float = 0.0, max_turn: float = 0.0) -> tuple[Tensor, Tensor]:
    """With probability ``prob`` paste a random patch (side in [min_side, max_side) of the image side, fully inside
    with ``margin``; turned by up to ``max_turn`` degrees either way) on each image. Returns the batch and the
    labels (1 = pasted).

    ``decoy_prob``: the share of the other (negative) images that get a *decoy* instead: a window of another image
    pasted the same way (:func:`decoy_windows`). Labelled clean, decoys teach the classifier the trigger's content
    rather than the traces of pasting (hard edges, a foreign square), which also fire on clean images that happen to
    hold a sharp-edged rectangle."""
    n, _, h, w = x.shape
    dev = x.device
    size = min(h, w)
    lo, hi = max(1.0, min_side * size), max(1.0, max_side * size)
    sides = torch.floor(_uniform(n, lo, hi, g, dev)).clamp(1, size)
    m = torch.full((n,), margin * size, device=dev)
    m = torch.minimum(m, ((size - sides) / 2).clamp(min=0))
    x0 = torch.floor(m + torch.rand(n, generator=g, device=dev) * (w - sides - 2 * m + 1).clamp(min=1))
    y0 = torch.floor(m + torch.rand(n, generator=g, device=dev) * (h - sides - 2 * m + 1).clamp(min=1))
    labels = (torch.rand(n, generator=g, device=dev) < prob).long()
    which = torch.randint(len(patches), (n,), generator=g, device=dev)
    which = torch.where(labels.bool(), which, torch.full_like(which, -1))
    if decoy_prob > 0:
        decoy = ~labels.bool() & (torch.rand(n, generator=g, device=dev) < decoy_prob)
        patches = torch.cat([patches.to(x.dtype), decoy_windows(x, patches.shape[-1], min_side, max_side, g)])
        which = torch.where(decoy, len(patches) - n + torch.arange(n, device=dev), which)
    turns = _uniform(n, -max_turn, max_turn, g, dev) * (math.pi / 180) if max_turn > 0 else None
    return paste_resized(x, patches, which, sides, x0, y0, turns), labels


def colour_augment(x: Tensor, g: torch.Generator, jitter: float = 0.4, hue: float = 0.1, p_jitter: float = 0.8,
                   p_gray: float = 0.2, p_flip: float = 0.5) -> Tensor:
    """Colour jitter, grayscale and horizontal flip on a float batch in [0, 1].

    Brightness, contrast, saturation and hue (a rotation of the YIQ chroma plane) are all affine in the pixel
    values, so the jitter is one per-image 3 x 3 matrix plus an offset: ``y = A x + t``, one pass over the batch.
    """
    n = x.shape[0]
    dev = x.device
    on = torch.rand(n, generator=g, device=dev) < p_jitter

    def factor(spread: float) -> Tensor:
        return torch.where(on, _uniform(n, 1 - spread, 1 + spread, g, dev), torch.ones(n, device=dev))

    b, c, s = factor(jitter), factor(jitter), factor(jitter)
    theta = torch.where(on, _uniform(n, -hue, hue, g, dev), torch.zeros(n, device=dev)) * 2 * math.pi
    gw = torch.tensor([0.299, 0.587, 0.114], device=dev)
    eye = torch.eye(3, device=dev)
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * gw[None, None, :]          # (y - gray) s + gray
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    rot = eye.repeat(n, 1, 1)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    hue_m = torch.linalg.inv(to_yiq)[None] @ rot @ to_yiq[None]
    # brightness b, then contrast c around the mean grey m: c b x + (1 - c) m; saturation and hue keep greys
    mat = (c * b)[:, None, None] * (hue_m @ sat)
    mean_grey = b * torch.einsum("c,nc->n", gw, x.mean((2, 3)))
    offset = ((1 - c) * mean_grey)[:, None, None, None]
    y = (torch.einsum("nij,njhw->nihw", mat.to(x.dtype), x) + offset.to(x.dtype)).clamp_(0, 1)
    to_gray = torch.rand(n, generator=g, device=dev) < p_gray
    grey = torch.einsum("c,nchw->nhw", gw.to(x.dtype), y)[:, None]
    y = torch.where(to_gray[:, None, None, None], grey.expand_as(y), y)
    flip = torch.rand(n, generator=g, device=dev) < p_flip
    return torch.where(flip[:, None, None, None], y.flip(3), y)
