"""Is a top-k window's picture held by many images of the data set, set apart from all the others?

The recurrence tests (detect/recurrence.py) look for a picture among the top-k windows, so they need several copies
of the trigger there. Where the poisons are few and scattered over many clusters (0.25% of tinyimagenet100: no
cluster holds more than 5 of 125), the search scores few of them and the top 20 hold four copies, two of them cut:
no group. Each copy is still pasted on every poison, and the data set shows it: every image's best match to a
trigger window (:func:`window_matches`, the recurrence test's similarity at every position) sorts into the poisons,
near 1, a gap, and the clean images far below. A clean window's best matches fall off smoothly. The statistic is
that gap: for each window, the largest drop between consecutive sorted best matches with at least
:data:`MIN_HOLDERS` images above it (:func:`largest_gap`, the window's own image left out). The null is the largest
gaps of the recurrence test's random windows (their own images left out, flat ones dropped), read past the largest
of them with an exponential tail (:func:`tail_probability`), so the run's own images set the bar
(:func:`held_picture_test`).

The images above the gap *hold* the picture. The significant windows whose holders are mostly the strongest one's
and whose gaps overlap it are the group; the picture match searches every image for it with the middle of the
shared gap as its bar (detect/matching.py). A picture that many images share as a whole (copies of one photograph)
passes too; the trigger gallery shows which it is. Costs one pass of small convolutions over every image for the k
top windows and the reference windows together; no threat-model forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from poisonscan import runtime as rt
from poisonscan.detect.recurrence import COMPARE_SIZE, FLAT_STD, SIGNIFICANCE, as_compared, normalised

#: the fewest images above a gap that count as holding a picture: an attack pastes its trigger on far more images
#: than this, while a picture held by one to four others is a near-copy of its own image (a convention, not fitted;
#: the random windows' gaps are measured with the same rule)
MIN_HOLDERS = 5
#: the share of the random windows' gaps, the largest, whose excesses set the exponential tail the test reads
#: beyond them (peaks over a threshold): 256 random windows cannot say how rare a gap above all of theirs is
#: (the upper quartile, a common peaks-over-threshold choice; not fitted, as is MIN_TAIL)
TAIL_SHARE = 0.25
#: the fewest random windows' gaps in that share for the tail to be fitted; with fewer the gaps are read as they are
#: (and a gap cannot be rarer than 1 in n + 1)
MIN_TAIL = 10
#: the most images above a gap, as a share of the data set: a trigger pasted on more than a quarter of it is not
#: looked for (it would also be the data set's most common picture)
MAX_HOLDER_SHARE = 0.25


def prepared_templates(templates_u8: Tensor) -> tuple[Tensor, float]:
    """The templates as the recurrence test compares windows (shrunk, each channel centred, unit norm, flat ones
    zeroed), as convolution kernels; and the factor the images must be shrunk by to match."""
    t = as_compared(templates_u8)
    w = int(templates_u8.shape[-1])
    return normalised(t).view_as(t), (COMPARE_SIZE / w if w > COMPARE_SIZE else 1.0)


def _similarity_maps(x: Tensor, tmpl: Tensor, scale: float) -> Tensor | None:
    """Each image's (``x``: B x C x S x S, 0-1) similarity to each template at every position, in the shrunk
    images' pixels: B x k x P x P (``None``: the images are smaller than the templates)."""
    k, c, w, _ = tmpl.shape
    if scale != 1.0:
        side = max(w, int(round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=(side, side), mode="area")
    if x.shape[-1] < w:
        return None
    area = float(w * w)
    # the templates are centred per channel, so the numerator needs no window mean
    num = F.conv2d(x, tmpl)                                                    # B x k x P x P
    mean = F.avg_pool2d(x, w, stride=1)                                        # B x C x P x P
    sq = F.avg_pool2d(x * x, w, stride=1)
    norm = ((sq - mean * mean).clamp_min(0.0) * area).sum(1, keepdim=True).sqrt()   # centred window's norm
    flat = norm < FLAT_STD * (c * area) ** 0.5
    return torch.where(flat, torch.zeros_like(num), num / norm.clamp_min(1e-12))


def _batch_matches(x: Tensor, tmpl: Tensor, scale: float) -> Tensor:
    """Each image's (``x``: B x C x S x S, 0-1) best similarity to each template: B x k."""
    sim = _similarity_maps(x, tmpl, scale)
    return torch.zeros(len(x), tmpl.shape[0], device=x.device) if sim is None else sim.amax(dim=(2, 3))


def best_boxes(images_u8: Tensor, templates_u8: Tensor, runtime: rt.Runtime, batch_size: int = 256) -> Tensor:
    """Where each image (uint8 n x 3 x S x S) best matches any of the templates (uint8 k x 3 x w x w): the
    window's box ``(x, y, w, w)`` in the image's pixels (int64 n x 4; the top-left corner where the images are
    smaller than the templates)."""
    n, w = int(images_u8.shape[0]), int(templates_u8.shape[-1])
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    boxes[:, 2:] = w
    if n == 0 or templates_u8.shape[0] == 0:
        return boxes
    tmpl, scale = prepared_templates(templates_u8)
    tmpl = tmpl.to(runtime.device)
    limit = max(0, int(images_u8.shape[-1]) - w)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = images_u8[start:start + batch_size].to(runtime.device).float() / 255.0
            sim = _similarity_maps(x, tmpl, scale)
            if sim is None:
                continue
            best = sim.amax(dim=1).flatten(1).argmax(dim=1).cpu()              # over templates, then positions
            side = int(sim.shape[-1])                  # positions in images shrunk to side + w - 1 pixels
            shrink = (side + int(tmpl.shape[-1]) - 1) / float(images_u8.shape[-1])
            xy = torch.stack([best % side, best // side], dim=1).double() / shrink
            boxes[start:start + len(x), :2] = xy.round().long().clamp(0, limit)
    return boxes


def window_matches(images_u8: Tensor, templates_u8: Tensor, runtime: rt.Runtime, batch_size: int = 256,
                   quiet: bool = True, label: str = "picture match", split: bool = False) -> Tensor:
    """For each image (uint8 N x 3 x S x S) and each template (uint8 k x 3 x w x w), the largest similarity of any
    of the image's windows to the template, in [-1, 1] (float32 N x k, on the CPU); windows flatter than
    :data:`FLAT_STD` count 0. With ``split`` the images are shared out among the ranks and the rows gathered."""
    n, k = int(images_u8.shape[0]), int(templates_u8.shape[0])
    if n == 0 or k == 0:
        return torch.zeros(n, k)
    tmpl, scale = prepared_templates(templates_u8)
    tmpl = tmpl.to(runtime.device)

    def work(share: range) -> Tensor:
        out = torch.empty(len(share), k)
        with torch.inference_mode(), rt.progress(label, len(share), quiet) as bar:
            for start in range(0, len(share), batch_size):
                idx = share[start:start + batch_size]
                x = images_u8[idx.start:idx.stop].to(runtime.device).float() / 255.0
                out[start:start + len(idx)] = _batch_matches(x, tmpl, scale).float().cpu()
                bar.advance(len(idx))
        return out

    if not split:
        return work(range(n))
    return torch.cat(rt.split_gather(runtime, n, work))


def largest_gap(matches: np.ndarray, own: int | None = None, min_holders: int = MIN_HOLDERS,
                max_share: float = MAX_HOLDER_SHARE) -> tuple[int, float, float, float]:
    """The largest drop between consecutive best matches (``matches``: one window's, every image), sorted from the
    highest, with at least ``min_holders`` (1 or more) and at most the larger of ``min_holders`` and ``max_share``
    of the images above it; the window's ``own`` image left out. Returns ``(holders, gap, lowest holder's match,
    highest other's match)``; no holders and no gap (0) when the window is flat or the data set too small."""
    m = np.asarray(matches, dtype=np.float64)
    if own is not None and 0 <= own < len(m):
        m = np.delete(m, own)
    min_holders = max(1, int(min_holders))
    if len(m) <= min_holders or not np.any(m != 0):
        return 0, 0.0, 1.0, 1.0
    top = min(max(min_holders, int(max_share * len(m))), len(m) - 1)
    best = -np.partition(-m, top)[:top + 1] if top + 1 < len(m) else m
    s = np.sort(best)[::-1]                        # the top + 1 best matches, from the highest
    gaps = s[:-1] - s[1:]                          # gaps[i]: between the (i+1)-th and the (i+2)-th best
    gaps[:min_holders - 1] = -np.inf
    i = int(np.argmax(gaps))
    return i + 1, float(gaps[i]), float(s[i]), float(s[i + 1])


def _tail(reference: np.ndarray, tail: float) -> tuple[float, float, float] | None:
    """``(threshold, share above it, mean excess)`` of the exponential tail over the reference gaps' ``1 - tail``
    quantile, or None where fewer than :data:`MIN_TAIL` gaps lie above it (then the gaps are read as they are)."""
    q = float(np.quantile(reference, 1.0 - tail))
    over = reference[reference > q] - q
    if over.size < MIN_TAIL:
        return None
    return q, over.size / reference.size, max(float(over.mean()), 1e-6)


def tail_probability(gap: float, reference: np.ndarray, tail: float = TAIL_SHARE) -> float:
    """The chance that a random window's largest gap reaches ``gap``: the share of the ``reference`` gaps that do
    (``(1 + count) / (1 + n)``), and above their ``1 - tail`` quantile an exponential tail fitted to the excesses over
    it (peaks over a threshold), which reaches past the largest reference gap."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        return 1.0
    fit = _tail(ref, tail)
    if fit is None or gap <= fit[0]:
        return float((1 + np.sum(ref >= gap)) / (1 + ref.size))
    q, share, scale = fit
    return share * float(np.exp(-(gap - q) / scale))


def tail_gap(reference: np.ndarray, k: int, level: float, tail: float = TAIL_SHARE) -> float:
    """The gap the largest of ``k`` random windows' gaps exceeds with chance ``level`` (the inverse of
    :func:`tail_probability` for the largest of k); 0 without reference gaps or windows."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0 or k < 1:
        return 0.0
    one = 1.0 - (1.0 - level) ** (1.0 / k)
    fit = _tail(ref, tail)
    if fit is None or one >= fit[1]:
        return float(np.quantile(ref, max(0.0, 1.0 - one)))
    q, share, scale = fit
    return q + scale * float(np.log(share / one))


def _holders(column: np.ndarray, gap: tuple[int, float, float, float], own: int) -> np.ndarray:
    """The images above a window's gap (its ``own`` image left out)."""
    held = np.flatnonzero(column >= (gap[2] + gap[3]) / 2)
    return held[held != own]


def holder_mask(matches: np.ndarray, members: list[int], bar: float, top_images: list[int]) -> np.ndarray:
    """The images beyond the group's own whose best match to one of its windows (``members``: columns of
    ``matches``, positions in ``top_images``) reaches the group's ``bar``: bool, one per row."""
    holds = np.asarray(matches)[:, members].max(axis=1) >= bar - 1e-9
    holds[np.asarray([top_images[j] for j in members], dtype=np.int64)] = False
    return holds


def held_picture_test(matches: np.ndarray, top_images: list[int], reference_images: list[int],
                      level: float = SIGNIFICANCE) -> dict[str, Any]:
    """The held-picture test on every image's best matches (``matches``: N x (k + n), the k top windows' columns
    first, then the n reference windows', cut from ``top_images`` and ``reference_images``). Each window's largest
    gap (:func:`largest_gap`) gets the chance that a random window's reaches it (:func:`tail_probability`; flat
    random windows, which hold nothing, are left out); the p-value is the chance that the largest of k random
    windows' gaps reaches the top-k's largest, ``1 - (1 - P)^k``. The group: the top-k windows whose own gap is
    significant that way at ``level``, whose holders are mostly the strongest one's and whose gaps overlap it (so
    one bar, the middle of the shared gap, serves them all). Returns the keys of the recurrence records (``size``,
    ``members``: positions in the top-k, the strongest first, ``bar``, ``quantile`` (``1 - level``), the reference
    gaps' median as ``null_group_median`` and the gap k random windows reach with chance ``level`` as
    ``null_group_p99``, ``p_value``, ``n_reference``, ``k``), with ``holders`` (images beyond the group's own
    whose best match to one of its windows reaches the bar) and ``gap`` (the top-k's largest)."""
    m = np.asarray(matches)
    k = len(top_images)
    owners = list(top_images) + list(reference_images)
    gaps = [largest_gap(m[:, j], own) for j, own in enumerate(owners)]
    top_gap = np.array([g[1] for g in gaps[:k]])
    ref_gap = np.array([g[1] for g in gaps[k:] if g[0] > 0])
    enough = k > 0 and len(ref_gap) >= max(k, 2)      # too few random windows to tell: no evidence either way

    def p_of(gap: float) -> float:
        return float(-np.expm1(k * np.log1p(-tail_probability(gap, ref_gap)))) if enough and gap > 0 else 1.0

    stat = float(top_gap.max()) if k else 0.0
    members: list[int] = []
    lo, hi = -np.inf, np.inf
    first = np.zeros(0, dtype=np.int64)
    for j in np.argsort(-top_gap, kind="stable"):
        if p_of(float(top_gap[j])) > level:
            break
        held = _holders(m[:, j], gaps[j], owners[j])
        if members and np.isin(held, first).sum() < 0.5 * len(held):
            continue                                     # another picture: its holders are not the group's
        j_lo, j_hi = max(lo, gaps[j][3]), min(hi, gaps[j][2])
        if j_lo < j_hi:                                  # one bar serves it and the group (the gaps overlap)
            first = held if not members else first
            members.append(int(j))
            lo, hi = j_lo, j_hi
    bar = float((lo + hi) / 2) if members else 1.0
    holders = int(holder_mask(m, members, bar, top_images).sum()) if members else 0
    return {
        "size": len(members),
        "members": members,
        "bar": bar,
        "quantile": 1.0 - level,
        "null_group_median": float(np.median(ref_gap)) if len(ref_gap) else 0.0,
        "null_group_p99": tail_gap(ref_gap, k, level) if enough else 0.0,
        "p_value": p_of(stat),
        "n_reference": int(len(ref_gap)),
        "k": int(k),
        "holders": holders,
        "gap": stat,
    }
