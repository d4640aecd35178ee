"""Neighbour consensus: the removal score of an image is its poison probability averaged with its nearest
neighbours' in the threat model's feature space.

The backdoor ties the trigger to one region of the threat model's feature space (that is what the cluster step of
PoisonCAM relies on), so a poison's nearest neighbours are mostly poisons the classifier also flags. A clean image the
pixel classifier flags by accident (a stripe, a checker pattern, a sharp-edged sign) sits among clean images it does
not flag. With ``p`` the classifier's P(poisonous), ``m`` the mean of ``p`` over the image's ``k`` nearest neighbours
(cosine, the image itself left out) and ``b`` the mean ``p`` of the whole data set (what ``k`` random neighbours
would show), the neighbours' *support* is ``s = clip((m - b) / (1 - b), 0, 1)``, the share of their probability
above that flag rate, and the removal score is ``(p + s) / 2``; at the threshold 0.5 an image is removed when
``p + s > 1``. A clearly flagged image needs some support from its neighbours beyond chance, and a poison the
classifier half-misses is removed when its neighbours are flagged. ``k = 0`` turns the step off (the paper's
decision, ``p`` alone). Measured in benchmarks/results/notebook.md section 5.
"""

from __future__ import annotations

import numpy as np

from poisonscan.detect.clustering import ASSIGN_CHUNK

#: up to this many images the neighbours are exact (one flat inner-product index); above, an inverted-file index
#: over the run's k-means centroids searches the ``nprobe`` nearest clusters of each image: a cost bound, not
#: fitted, so the removal score of every scan of more than 20,000 images uses approximate neighbours
EXACT_LIMIT = 20_000
NPROBE = 8


def _normalised(features: np.ndarray, chunk: int = ASSIGN_CHUNK) -> np.ndarray:
    """L2-normalised float32 copy of ``features`` (N x D, any float dtype or memory-mapped), converted in chunks."""
    out = np.empty(features.shape, dtype=np.float32)
    for s in range(0, len(features), chunk):
        x = np.asarray(features[s:s + chunk], dtype=np.float32)
        out[s:s + chunk] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def nearest_neighbours(features: np.ndarray, k: int, centroids: np.ndarray | None = None,
                       exact_limit: int = EXACT_LIMIT, nprobe: int = NPROBE,
                       chunk: int = ASSIGN_CHUNK) -> np.ndarray:
    """Indices (N x k int64) of each row's ``k`` nearest other rows by cosine similarity.

    Exact for ``N <= exact_limit``; larger sets use the k-means ``centroids`` (fitted on the same normalised
    features) as the coarse quantiser of an inverted-file index. Fewer than ``k`` other rows: all of them, padded by
    repeating the last; an inverted-file miss is filled with the row itself.
    """
    import faiss

    n = len(features)
    k_eff = min(k, n - 1)
    if k <= 0 or k_eff <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    x = _normalised(features, chunk)
    d = x.shape[1]
    if n <= exact_limit or centroids is None:
        index = faiss.IndexFlatIP(d)
    else:
        cents = _normalised(np.asarray(centroids))
        quantiser = faiss.IndexFlatIP(d)
        quantiser.add(cents)
        index = faiss.IndexIVFFlat(quantiser, d, len(cents), faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True              # the coarse centroids are the run's own k-means
        index.nprobe = min(nprobe, len(cents))
    index.add(x)
    out = np.empty((n, k_eff), dtype=np.int64)
    for s in range(0, n, chunk):
        _, hits = index.search(x[s:s + chunk], k_eff + 1)
        own = np.arange(s, s + len(hits))[:, None]
        bad = (hits == own) | (hits < 0)              # the image itself, and misses of the inverted file
        hits = np.take_along_axis(hits, np.argsort(bad, axis=1, kind="stable"), axis=1)[:, :k_eff]
        out[s:s + len(hits)] = np.where(hits < 0, own, hits)
    if k_eff < k:
        out = np.concatenate([out, np.repeat(out[:, -1:], k - k_eff, axis=1)], axis=1)
    return out


def neighbour_mean(probs: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Mean classifier probability of each image's neighbours (float32 N; the image's own where it has none)."""
    probs = np.asarray(probs, dtype=np.float32)
    if neighbours.shape[1] == 0:
        return probs.copy()
    return probs[neighbours].mean(axis=1).astype(np.float32)


def neighbour_support(neighbour_means: np.ndarray, flag_rate: float) -> np.ndarray:
    """``clip((m - b) / (1 - b), 0, 1)``: how far the neighbours' mean probability ``m`` lies above the data set's
    flag rate ``b`` (the mean probability), as a share of the room above it (float32 N)."""
    m = np.asarray(neighbour_means, dtype=np.float32)
    b = min(max(float(flag_rate), 0.0), 1.0 - 1e-6)
    return np.clip((m - b) / (1.0 - b), 0.0, 1.0).astype(np.float32)


def removal_score(probs: np.ndarray, neighbour_means: np.ndarray | None) -> np.ndarray:
    """``(p + neighbour support) / 2`` (float32 N, see the module docstring) from the neighbours' mean
    probabilities (:func:`neighbour_mean`); ``p`` itself when there are none (``--set decision.neighbours=0``)."""
    probs = np.asarray(probs, dtype=np.float32)
    if neighbour_means is None or probs.size == 0:
        return probs.copy()
    return ((probs + neighbour_support(neighbour_means, float(probs.mean()))) / 2).astype(np.float32)
