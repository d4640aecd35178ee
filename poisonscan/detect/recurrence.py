"""Does one pattern recur among the top-k candidate windows? The evidence a person sees in the trigger gallery.

A trigger pasted onto many images is cut from each of them by the search, and every copy does the same thing to
the threat model: it sends the flip-set images it moves to the same clusters (the target's), by moving their
features the same way. High-contrast clean windows also move many flip-set images, at small image sizes often half
of them, but each sends them somewhere of its own. So two windows are *alike* when both where they send the flip set
(the cosine similarity of their destination profiles, :func:`destination_profiles`) and how they move its features
(the cosine similarity of their mean feature shifts, less the shift every strong window shares) are more similar
than for nearly all pairs of random windows; the statistic is the largest group of top-k windows alike to one of
them (:func:`largest_group`). Either signature alone fails somewhere: cluster profiles cannot tell windows apart
when there are few clusters, and strong windows share part of their feature shift (docs/design.md, "The evidence
gate").

Both bars are calibrated by the run itself: a high quantile of the similarities between the strongest random
windows of the evidence test (those that move about as much as the top-k do), and the group size is compared with
the largest groups among as many of those random windows (:func:`recurrence_test`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the quantile of the similarities between strong random windows above which two windows count as alike
ALIKE_QUANTILE = 0.99
#: the p-value at which a group counts as recurring (for ``--classifier-positives recurring``)
SIGNIFICANCE = 0.01


def destination_profiles(dest: np.ndarray, flip_labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``n x n_clusters`` counts: for each window (a row of ``dest``, the clusters the F flip images are assigned
    to with it pasted), how many of the flip images it moves land in each cluster."""
    dest = np.asarray(dest, dtype=np.int64)
    moved = dest != np.asarray(flip_labels, dtype=np.int64).reshape(1, -1)
    rows = np.broadcast_to(np.arange(dest.shape[0])[:, None], dest.shape)
    out = np.zeros((dest.shape[0], int(n_clusters)), dtype=np.float64)
    np.add.at(out, (rows[moved], dest[moved]), 1.0)
    return out


def profile_similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of destination profiles (rows of ``a`` against rows of ``b``, or of ``a``); 0 for a window
    that moves nothing."""
    b = a if b is None else b
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.maximum(na, 1e-12)) @ (b / np.maximum(nb, 1e-12)).T


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


def recurrence_test(top_dest: np.ndarray, top_shift: np.ndarray, null_dest: np.ndarray, null_shift: np.ndarray,
                    null_scores: np.ndarray, flip_labels: np.ndarray, n_clusters: int, n_boot: int = 1000,
                    seed: int = 0, quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """Compare the largest group of alike windows among the top-k with the largest groups among k of the strongest
    random windows.

    ``*_dest``: the cluster of every flip image with the window pasted (n x F); ``*_shift``: the mean shift of the
    flip images' features (n x D); ``null_scores``: the random windows' poison scores. The reference windows are the
    ``min(len(null), 5 k)`` random windows with the highest scores. Two windows are alike when both their destination
    profiles and their feature shifts (less the reference windows' mean shift) are at least as similar as the
    ``quantile`` of the reference pairs' similarities (``bar_clusters``, ``bar_shift``). The bootstrap draws ``k``
    reference windows ``n_boot`` times and records each draw's largest group. Returns the group's ``size`` and
    ``members`` (positions in the top-k, the centre first), both bars, the reference groups' median and 99th
    percentile, ``p_value`` (``(1 + #{reference groups >= size}) / (1 + n_boot)``), ``n_reference`` and ``k``.
    """
    labels = np.asarray(flip_labels)
    k = len(top_dest)
    ref = np.argsort(-np.asarray(null_scores), kind="stable")[:min(len(null_scores), 5 * k)]
    shared = np.asarray(null_shift, dtype=np.float64)[ref].mean(0, keepdims=True)
    signatures = (
        (destination_profiles(top_dest, labels, n_clusters), destination_profiles(np.asarray(null_dest)[ref], labels,
                                                                                  n_clusters)),
        (np.asarray(top_shift, dtype=np.float64) - shared, np.asarray(null_shift, dtype=np.float64)[ref] - shared),
    )
    alike_top = np.ones((k, k), dtype=bool)
    alike_ref = np.ones((len(ref), len(ref)), dtype=bool)
    bars = []
    for top_sig, ref_sig in signatures:
        ref_sim = profile_similarity(ref_sig)
        pairs = ref_sim[np.triu_indices(len(ref), 1)]
        bar = float(np.quantile(pairs, quantile)) if pairs.size else 1.0
        bars.append(bar)
        alike_ref &= ref_sim >= bar - 1e-9
        alike_top &= profile_similarity(top_sig) >= bar - 1e-9
    size, members = largest_group(alike_top)
    rng = np.random.default_rng(seed)
    if len(ref) < max(k, 2):                # too few random windows to draw k of them: no evidence either way
        boot = np.full(1, k)
    else:
        boot = np.array([largest_group(alike_ref[np.ix_(pick, pick)])[0]
                         for pick in (rng.choice(len(ref), k, replace=False) for _ in range(n_boot))])
    return {
        "size": size,
        "members": members,
        "bar_clusters": bars[0],
        "bar_shift": bars[1],
        "quantile": quantile,
        "null_group_median": float(np.median(boot)),
        "null_group_p99": float(np.quantile(boot, 0.99)),
        "p_value": float((1 + int((boot >= size).sum())) / (1 + len(boot))),
        "n_reference": int(len(ref)),
        "k": int(k),
    }
