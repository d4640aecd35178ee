"""Does one pattern recur among the top-k candidate windows? The evidence a person sees in the trigger gallery.

A trigger pasted onto many images is cut from each of them by the search, and every copy does the same thing to
the threat model: it sends the flip-set images it moves to the same clusters (the target's). High-contrast clean
windows also move many flip-set images, at small image sizes often half of them, but each sends them somewhere of
its own. So two windows are *alike* when the flip-set images they move land in the same clusters in the same
proportions (the cosine similarity of their destination profiles, :func:`profile_similarity`), and the statistic is
the largest group of top-k windows alike to one of them (:func:`largest_group`).

Both are calibrated by the run itself: the bar for "alike" is a high quantile of the overlap between random windows
of the same data set that move as much as the top-k do (the null windows of the evidence test), and the group size
is compared with the largest group among as many such random windows (:func:`recurrence_test`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the quantile of the similarities between strong random windows above which two windows count as alike
ALIKE_QUANTILE = 0.99


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


def largest_group(similarity: np.ndarray, bar: float) -> tuple[int, list[int]]:
    """The largest group of windows alike (similarity >= ``bar``) to one of them, that one included: its size and
    members (window indices, the centre first)."""
    n = similarity.shape[0]
    if n == 0:
        return 0, []
    alike = similarity >= bar
    np.fill_diagonal(alike, True)
    sizes = alike.sum(1)
    centre = int(np.argmax(sizes))
    members = [centre] + [int(j) for j in np.flatnonzero(alike[centre]) if j != centre]
    return int(sizes[centre]), members


def recurrence_test(top_dest: np.ndarray, null_dest: np.ndarray, null_scores: np.ndarray, flip_labels: np.ndarray,
                    n_clusters: int, n_boot: int = 1000, seed: int = 0,
                    quantile: float = ALIKE_QUANTILE) -> dict[str, Any]:
    """Compare the largest group of alike windows among the top-k (``top_dest``, k x F destination clusters) with
    the largest groups among k windows drawn from the strongest null windows (``null_dest``, ``null_scores``).

    The reference windows are the ``min(len(null), 5 k)`` null windows with the highest poison scores: random
    windows that move about as much as the top-k. ``bar`` is the ``quantile`` of their pairwise similarities; the
    bootstrap draws ``k`` of them ``n_boot`` times and records each draw's largest group. Returns the group's
    ``size`` and ``members`` (positions in the top-k, the centre first), ``bar``, the reference groups' median and
    99th percentile, ``p_value`` (``(1 + #{reference groups >= size}) / (1 + n_boot)``), the median similarity of
    the top-k windows to the group's centre and that of the reference pairs.
    """
    labels = np.asarray(flip_labels)
    top = destination_profiles(top_dest, labels, n_clusters)
    k = top.shape[0]
    order = np.argsort(-np.asarray(null_scores), kind="stable")
    ref = destination_profiles(np.asarray(null_dest)[order[:min(len(order), 5 * k)]], labels, n_clusters)
    ref_sim = profile_similarity(ref)
    pairs = ref_sim[np.triu_indices(len(ref), 1)]
    bar = float(np.quantile(pairs, quantile)) if pairs.size else 1.0
    bar = min(max(bar, 1e-9), 1.0)
    sim = profile_similarity(top)
    size, members = largest_group(sim, bar)
    rng = np.random.default_rng(seed)
    m = min(k, len(ref))
    boot = np.array([largest_group(ref_sim[np.ix_(pick, pick)], bar)[0]
                     for pick in (rng.choice(len(ref), m, replace=False) for _ in range(n_boot))]) \
        if m > 0 else np.zeros(1)
    return {
        "size": size,
        "members": members,
        "bar": bar,
        "quantile": quantile,
        "null_group_median": float(np.median(boot)),
        "null_group_p99": float(np.quantile(boot, 0.99)),
        "p_value": float((1 + int((boot >= size).sum())) / (1 + len(boot))),
        "centre_similarity_median": float(np.median(sim[members[0]])) if members else 0.0,
        "reference_similarity_median": float(np.median(pairs)) if pairs.size else 0.0,
        "n_reference": int(len(ref)),
        "k": int(k),
    }
