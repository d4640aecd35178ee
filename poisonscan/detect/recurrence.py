"""Does one picture recur among the top-k candidate windows? The evidence a person sees in the trigger gallery.

A trigger pasted onto many images is cut from each of them by the search, so the top-k windows of a poisoned data
set hold copies of one picture, each a pixel or two off where the attention put the window. High-contrast clean
windows can score as high (at small image sizes they move half the flip set), but each shows something of its own.
Two windows are *alike* when their normalised cross-correlation, the best over small shifts
(:func:`window_similarity`), is at least a high quantile of the same similarity between random windows of the
evidence test: the bar is set by the run's own data. The statistic is the largest group of top-k windows alike to
one of them (:func:`largest_group`), compared with the largest groups that as many random windows form
(:func:`recurrence_test`). No forward pass is needed: the windows are the ones the search and the evidence test
already cut.

The test looks at pixels, so it sees patch triggers (pasted the same way on every image) and not triggers spread
over the whole image (blending, frequency triggers), which the effect bar of the evidence gate still catches
(detect/evidence.py, :func:`~poisonscan.detect.evidence.evidence_gate`).

A trigger changed copy by copy (scaled, turned, recoloured) is not alike pixel for pixel at that bar, which smooth
windows set: they are alike to many windows. Its copies are still more alike to each other than to almost any random
window, which :func:`changed_copies_test` asks with a bar per window (its own 99th percentile of similarities to the
random windows): a flat or smooth window, alike to many, gets a high bar; a trigger's copy, alike to its other copies
only, a low one. The picture match then looks for such a group's picture with the outlier bar over all images
(detect/matching.py), which also tells a pattern common to the data from a pasted trigger. Where the top-k hold too
few copies to group, the data set itself may show the picture recurring: detect/holders.py.

The threat model, which learned the trigger, also sees one thing in its changed copies:
:func:`feature_recurrence_test` compares the windows by the threat model's features instead (each window alone on a
masked canvas, :func:`embed_windows`), against windows the search itself would pick in random images
(``search_like``): selected windows resemble each other more than uniform ones do, and a null of uniform windows let
7 clean windows of a weakly poisoned CIFAR-10 model group at p 0.001 (benchmarks/studies/feature_recurrence.py). It
costs the masking of :data:`REFERENCE_SIZE` images and k + :data:`REFERENCE_SIZE` forwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonscan.detect.features import encode, eval_mode
from poisonscan.detect.records import Evidence, Recurrence
from poisonscan.runtime import broadcast_object

#: the quantile of the similarities between random windows above which two windows count as alike
ALIKE_QUANTILE = 0.99
#: the p-value at which a group counts as recurring (the default of ``decision.max_recurrence_p``)
SIGNIFICANCE = 0.01
#: the first this many random windows of the evidence test (drawn uniformly) are the reference. This and the next
#: two are conventions of the comparison, not fitted to any run: set once with the test and kept on every run since
REFERENCE_SIZE = 256
#: windows are compared over shifts of up to this share of their width each way (a trigger smaller than the window
#: sits anywhere in it)
SHIFT_SHARE = 1 / 3
#: windows wider than this are shrunk (area average) to this many pixels before they are compared (a cost bound)
COMPARE_SIZE = 16
#: the share of the changed copies' group's windows that the held-picture group must hold to decide in its place.
#: A trigger pasted unchanged: 5 of 5 (tinyimagenet100 at 0.25% with trigger_10, where the shared bar missed the
#: group); changed copy by copy (triggers 11-13 on three runs): held groups of one window (a copy few others
#: resemble closely) against changed groups of 8, 12 and 17. Half is the middle, a convention; chosen on that
#: trigger_10 run with the three changed ones in view
HELD_SHARE = 0.5
#: a window whose pixels vary less than this (standard deviation, in units of the pixel range) shows no pattern
#: (a convention: 2% of the range is below any visible texture; not fitted)
FLAT_STD = 0.02


def as_compared(windows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``n x C x w x w`` windows (uint8 0-255, or float 0-1) as float32 0-1, shrunk to :data:`COMPARE_SIZE`."""
    t = torch.as_tensor(windows)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim != 4 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"windows must be n x C x w x w, got {tuple(t.shape)}")
    if t.shape[-1] > COMPARE_SIZE:
        t = F.adaptive_avg_pool2d(t, COMPARE_SIZE)
    return t


def normalised(x: torch.Tensor) -> torch.Tensor:
    """``n x C x h x w`` windows as rows, each channel centred (a colour cast is no pattern), scaled to unit norm;
    a row flatter than :data:`FLAT_STD` becomes zero."""
    x = (x - x.mean((2, 3), keepdim=True)).flatten(1)
    norm = x.norm(dim=1, keepdim=True)
    flat = norm < FLAT_STD * x.shape[1] ** 0.5
    return torch.where(flat, torch.zeros_like(x), x / norm.clamp_min(1e-12))


def window_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor | None = None,
                      max_shift: int | None = None) -> np.ndarray:
    """Similarity of windows ``a`` (n x C x w x w) to windows ``b`` (m x C x w x w; default ``a``): the largest
    normalised cross-correlation of their overlap (each channel centred, all scaled together) over shifts of up to
    ``max_shift`` pixels each way (default :data:`SHIFT_SHARE` of the compared width: a trigger smaller than the
    window sits anywhere in it). n x m floats in [-1, 1]; 0 against a flat window."""
    ta = as_compared(a)
    tb = ta if b is None else as_compared(b)
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"windows of different shapes: {tuple(ta.shape[1:])} and {tuple(tb.shape[1:])}")
    w = int(ta.shape[-1])
    s = int(w * SHIFT_SHARE) if max_shift is None else max(0, min(int(max_shift), w - 1))
    best = torch.full((ta.shape[0], tb.shape[0]), -1.0)
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            h, ww = w - abs(dy), w - abs(dx)
            ya, yb = max(dy, 0), max(-dy, 0)
            xa, xb = max(dx, 0), max(-dx, 0)
            pa = normalised(ta[:, :, ya:ya + h, xa:xa + ww])
            pb = normalised(tb[:, :, yb:yb + h, xb:xb + ww])
            best = torch.maximum(best, pa @ pb.T)
    return best.numpy().astype(np.float64)


def largest_group(alike: np.ndarray) -> tuple[int, list[int]]:
    """The largest group of windows alike (``alike``, a boolean n x n matrix) to one of them, that one included: its
    size and members (window indices, the centre first)."""
    n = alike.shape[0]
    if n == 0:
        return 0, []
    alike = np.array(alike, dtype=bool)
    np.fill_diagonal(alike, True)
    sizes = alike.sum(1)
    centre = int(np.argmax(sizes))
    members = [centre] + [int(j) for j in np.flatnonzero(alike[centre]) if j != centre]
    return int(sizes[centre]), members


def recurrence_test(top_windows: np.ndarray | torch.Tensor, null_windows: np.ndarray | torch.Tensor,
                    n_boot: int = 1000, seed: int = 0, quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """Compare the largest group of alike windows among the top-k with the largest groups among k random windows.

    ``top_windows``: the k top-k windows; ``null_windows``: the evidence test's random windows, of which the first
    :data:`REFERENCE_SIZE` are the reference. Not the strongest ones: where a tenth of the data is poisoned, the
    random windows that score highest are the ones that happen to cover a trigger, and their copies would raise
    the bar to the trigger's own similarity (drawn uniformly, a few copies among 256 windows leave the 99th
    percentile of their pairs alone). Two windows are alike when their
    :func:`window_similarity` is at least the ``quantile`` of the reference pairs' similarities (``bar``) and above
    0. The bootstrap draws ``k`` reference windows ``n_boot`` times and records each draw's largest group. Returns
    the group's ``size`` and ``members`` (positions in the top-k, the centre first), ``bar``, the reference groups'
    median and 99th percentile, ``p_value`` (``(1 + #{reference groups >= size}) / (1 + n_boot)``),
    ``n_reference``, ``k`` and ``signature`` ("pixels": what the windows are compared by).
    """
    k = len(top_windows)
    ref_windows = torch.as_tensor(null_windows)[:REFERENCE_SIZE]
    ref_sim = window_similarity(ref_windows) if len(ref_windows) else np.zeros((0, 0))
    top_sim = window_similarity(top_windows) if k else np.zeros((0, 0))
    return {"signature": "pixels", **group_test(top_sim, ref_sim, n_boot, seed, quantile)}


def pixel_recurrence_tests(top_windows: np.ndarray | torch.Tensor, null_windows: np.ndarray | torch.Tensor,
                           n_boot: int = 1000, seed: int = 0, quantile: float = ALIKE_QUANTILE,
                           changed: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`recurrence_test` and :func:`changed_copies_test` of the same windows, the similarities computed once:
    ``(pixels, changed)`` (``changed`` None when not asked for)."""
    k = len(top_windows)
    ref_windows = torch.as_tensor(null_windows)[:REFERENCE_SIZE]
    ref_sim = window_similarity(ref_windows) if len(ref_windows) else np.zeros((0, 0))
    top_sim = window_similarity(top_windows) if k else np.zeros((0, 0))
    pixels = {"signature": "pixels", **group_test(top_sim, ref_sim, n_boot, seed, quantile)}
    if not changed:
        return pixels, None
    cross = window_similarity(top_windows, ref_windows) if k and len(ref_windows) else np.zeros((k, 0))
    return pixels, {"signature": "changed", **own_bar_test(top_sim, cross, ref_sim, n_boot, seed, quantile)}


def changed_copies_test(top_windows: np.ndarray | torch.Tensor, null_windows: np.ndarray | torch.Tensor,
                        n_boot: int = 1000, seed: int = 0, quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """Copies of one picture changed copy by copy among the top-k windows (:func:`own_bar_test` on
    :func:`window_similarity`, against the same reference windows as :func:`recurrence_test`). Same returns, with
    ``signature`` "changed" and ``bar`` the lowest of the group's own bars."""
    changed = pixel_recurrence_tests(top_windows, null_windows, n_boot, seed, quantile)[1]
    assert changed is not None
    return changed


def own_bar_test(top_sim: np.ndarray, cross_sim: np.ndarray, ref_sim: np.ndarray, n_boot: int = 1000,
                 seed: int = 0, quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """The group statistic of :func:`group_test` with a bar per window: two windows are alike when their similarity
    reaches the ``quantile`` of each one's similarities to the reference windows (``cross_sim``: k x n for the top-k,
    ``ref_sim``: n x n, each reference window's bar leaving itself out). Returns :func:`group_test`'s keys; ``bar``
    is the lowest bar in the group (the median of the top-k's bars when no two windows are alike)."""
    k, n = len(top_sim), len(ref_sim)
    if n < 2 or cross_sim.shape[1] == 0:
        top_bar = np.ones(k)
        ref_bar = np.ones(n)
    else:
        top_bar = np.quantile(cross_sim, quantile, axis=1)
        off = np.array(ref_sim, dtype=np.float64)
        np.fill_diagonal(off, np.nan)
        ref_bar = np.nanquantile(off, quantile, axis=1)
    alike_top = (top_sim >= np.maximum.outer(top_bar, top_bar) - 1e-9) & (top_sim > 0)
    alike_ref = (ref_sim >= np.maximum.outer(ref_bar, ref_bar) - 1e-9) & (ref_sim > 0)
    size, members, boot = _group_and_null(alike_top, alike_ref, n_boot, seed)
    bar = float(top_bar[members].min()) if size > 1 else (float(np.median(top_bar)) if k else 1.0)
    return _group_record(size, members, bar, quantile, boot, n, k)


def group_test(top_sim: np.ndarray, ref_sim: np.ndarray, n_boot: int = 1000, seed: int = 0,
               quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """The statistic of :func:`recurrence_test` on any similarity: ``top_sim`` (k x k) between the top-k windows,
    ``ref_sim`` (n x n) between the reference windows. Returns ``size``, ``members``, ``bar``, ``quantile``, the
    reference groups' median and 99th percentile, ``p_value``, ``n_reference`` and ``k``."""
    k, n = len(top_sim), len(ref_sim)
    pairs = ref_sim[np.triu_indices(n, 1)]
    bar = float(np.quantile(pairs, quantile)) if pairs.size else 1.0
    alike_ref = (ref_sim >= bar - 1e-9) & (ref_sim > 0)
    size, members, boot = _group_and_null((top_sim >= bar - 1e-9) & (top_sim > 0), alike_ref, n_boot, seed)
    return _group_record(size, members, bar, quantile, boot, n, k)


def _group_and_null(alike_top: np.ndarray, alike_ref: np.ndarray, n_boot: int, seed: int
                    ) -> tuple[int, list[int], np.ndarray]:
    """The largest group of the top-k (``alike_top``, k x k) and the largest groups of ``n_boot`` draws of k
    reference windows (``alike_ref``, n x n)."""
    k, n = len(alike_top), len(alike_ref)
    size, members = largest_group(alike_top)
    rng = np.random.default_rng(seed)
    if n < max(k, 2):                       # too few random windows to draw k of them: no evidence either way
        boot = np.full(1, k)
    else:
        boot = np.array([largest_group(alike_ref[np.ix_(pick, pick)])[0]
                         for pick in (rng.choice(n, k, replace=False) for _ in range(n_boot))])
    return size, members, boot


def _group_record(size: int, members: list[int], bar: float, quantile: float, boot: np.ndarray,
                  n_reference: int, k: int) -> dict[str, Any]:
    """A group test's returns: the group, its bar, the reference groups' median and 99th percentile, the p-value."""
    return {
        "size": size,
        "members": members,
        "bar": bar,
        "quantile": quantile,
        "null_group_median": float(np.median(boot)),
        "null_group_p99": float(np.quantile(boot, 0.99)),
        "p_value": float((1 + int((boot >= size).sum())) / (1 + len(boot))),
        "n_reference": int(n_reference),
        "k": int(k),
    }


def embed_windows(encoder: Any, windows: torch.Tensor, side: int, runtime: Any, batch_size: int = 256
                  ) -> torch.Tensor:
    """The threat model's L2-normalised features of ``windows`` (uint8 n x 3 x w x w), each at the centre of an
    ``side`` x ``side`` canvas whose rest is zeroed in the normalised input (as cluster activation masking masks
    pixels): the window as the model sees it alone. Under torchrun rank 0 embeds them all, in the batches of a
    single process (so the features, and the test, do not depend on the world size), and sends them to the others."""
    if runtime.world_size > 1 and not runtime.is_main:
        return broadcast_object(None)
    w = int(windows.shape[-1])
    o = (side - w) // 2
    canvas = torch.zeros(len(windows), 3, side, side, dtype=torch.uint8)
    canvas[:, :, o:o + w, o:o + w] = windows
    outside = torch.ones(side, side, dtype=torch.bool)
    outside[o:o + w, o:o + w] = False
    with eval_mode(encoder):
        parts = [encode(encoder, canvas[i:i + batch_size], runtime, zero_mask=outside)
                 for i in range(0, len(canvas), batch_size)]
    feats = torch.cat(parts) if parts else torch.zeros(0, 0)
    return broadcast_object(feats) if runtime.world_size > 1 else feats


def feature_recurrence_test(encoder: Any, top_windows: torch.Tensor, search_like: torch.Tensor, side: int,
                            runtime: Any, n_boot: int = 1000, seed: int = 0, quantile: float = ALIKE_QUANTILE,
                            batch_size: int = 256) -> dict[str, Any]:
    """:func:`group_test` on the threat model's features (:func:`embed_windows`; cosine similarity): the top-k
    windows against the first :data:`REFERENCE_SIZE` of ``search_like``, windows the search picks in random images
    (detect/search.py, :func:`~poisonscan.detect.search.search_like_windows`). Same returns as
    :func:`recurrence_test`, with ``signature`` "features"."""
    ref = torch.as_tensor(search_like)[:REFERENCE_SIZE]
    feats = embed_windows(encoder, torch.cat([torch.as_tensor(top_windows), ref]), side, runtime, batch_size)
    k = len(top_windows)
    top_f, ref_f = feats[:k].double(), feats[k:].double()
    return {"signature": "features",
            **group_test((top_f @ top_f.T).numpy(), (ref_f @ ref_f.T).numpy(), n_boot, seed, quantile)}


def recurring_group(ev: Evidence, max_p: float) -> Recurrence | None:
    """The evidence record ``ev``'s recurring picture: the recurrence test's group (``p <= max_p``), else the
    changed copies' (:func:`changed_copies_test`), else the windows whose picture many images of the data set hold
    (detect/holders.py), else None: what the picture match asks (it searches every image for that picture). The
    held group comes before the changed copies' where it holds at least :data:`HELD_SHARE` of their windows: those
    copies are alike as they are (the changed copies' test, a bar per window, also groups exact copies that the
    shared bar misses), and the held group's bar, the middle of their gap, tells them from the rest."""
    if max_p <= 0:                              # 0: no recurring picture is asked for
        return None
    pixels, changed, held = (rec if rec is not None and rec.p_value <= max_p and rec.size > 0 else None
                             for rec in (ev.recurrence, ev.changed_recurrence, ev.held_recurrence))
    if pixels is None and changed is not None and held is not None and held_as_they_are(changed, held):
        return held
    return pixels or changed or held


def held_as_they_are(changed: Recurrence, held: Recurrence) -> bool:
    """Are at least :data:`HELD_SHARE` of the changed copies' group's windows in the held-picture group?"""
    return len(set(changed.members) & set(held.members)) >= HELD_SHARE * changed.size


def changed_copies(ev: Evidence, max_p: float) -> bool:
    """Is the picture the match searches for a trigger changed copy by copy (the changed copies' group, not the
    recurrence test's)? Its copies then differ, so the match finds those close to the group's windows and the
    classifier the rest."""
    rec = recurring_group(ev, max_p)
    return rec is not None and rec.signature == "changed"


def trigger_group(ev: Evidence, max_p: float) -> Recurrence | None:
    """The top-k windows taken as one trigger's copies: the recurring picture (:func:`recurring_group`, exact or
    changed copies, or held across the data set), else the group that looks alike to the threat model
    (``ev.feature_recurrence`` at ``p <= max_p``), else None: what the evidence gate and the classifier's positives
    ask."""
    rec = recurring_group(ev, max_p)
    if rec is not None:
        return rec
    feat = ev.feature_recurrence
    return feat if feat is not None and feat.p_value <= max_p and max_p > 0 else None
