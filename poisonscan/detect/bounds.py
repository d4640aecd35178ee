"""Sequential flip testing: how many flip-set images a window can still move, from the ones it was tested on.

The flip set is tested in a fixed random order, so the first ``n`` of its ``F`` images are a sample drawn without
replacement, and a window that moved ``c`` of them moves ``K`` of all ``F`` with a hypergeometric likelihood.
:func:`hypergeom_upper` is the largest ``K`` that still explains seeing at most ``c`` with probability above
``delta``: a one-sided bound that fails for at most a share ``delta`` of the windows whose full score is at least a
given value. The adaptive stages (detect/fliptest.py, :meth:`FlipTest.staged_scores`) stop a window once this bound
falls below what would still matter (the search's top-k, the null's upper tail).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: the flip-set shares after which a window's bound is checked (the last stage is the whole flip set)
STAGES = (0.125, 0.25, 0.5, 1.0)
MIN_STAGE = 16          # no stage tests fewer flip-set images than this (small flip sets)


@lru_cache(maxsize=32)
def _log_factorials(n: int) -> np.ndarray:
    return np.array([math.lgamma(i + 1) for i in range(n + 1)], dtype=np.float64)


@lru_cache(maxsize=64)
def _upper_table(population: int, tested: int, delta: float) -> np.ndarray:
    """``table[c]``: the upper bound on ``K`` after ``c`` hits in ``tested`` draws (int64, ``tested + 1`` entries)."""
    f, n = int(population), int(tested)
    lf = _log_factorials(f)
    k = np.arange(f + 1)[:, None]                    # hits in the population
    c = np.arange(n + 1)[None, :]                    # hits in the sample
    ok = (c <= k) & (n - c <= f - k)
    kk, cc = np.broadcast_arrays(k, c)
    a = np.where(ok, kk, 0)
    b = np.where(ok, cc, 0)
    log_pmf = (lf[a] - lf[b] - lf[np.clip(a - b, 0, None)]
               + lf[np.where(ok, f - kk, 0)] - lf[np.where(ok, n - cc, 0)]
               - lf[np.clip(np.where(ok, (f - kk) - (n - cc), 0), 0, None)]
               - (lf[f] - lf[n] - lf[f - n]))
    cdf = np.cumsum(np.where(ok, np.exp(log_pmf), 0.0), axis=1)    # P(sample hits <= c | K)
    # the cdf falls as K grows: the bound is the last K whose cdf is still above delta
    return (cdf > delta).sum(axis=0).astype(np.int64) - 1


def hypergeom_upper(hits: np.ndarray, tested: int, population: int, delta: float) -> np.ndarray:
    """Upper bounds on each window's hits in the whole flip set (``population`` images) after ``hits`` of its first
    ``tested`` (int64, same shape; exact, ``hits`` itself, when the whole set was tested)."""
    hits = np.asarray(hits, dtype=np.int64)
    if tested >= population:
        return hits.copy()
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    table = _upper_table(int(population), int(tested), float(delta))
    return np.maximum(table[np.clip(hits, 0, tested)], hits)


def stage_sizes(population: int, shares: tuple[float, ...] = STAGES, minimum: int = MIN_STAGE) -> list[int]:
    """How many flip-set images have been tested after each stage: increasing, ending at ``population``."""
    sizes: list[int] = []
    for share in shares:
        n = min(population, max(minimum, math.ceil(share * population)))
        if not sizes or n > sizes[-1]:
            sizes.append(n)
    if sizes[-1] != population:
        sizes.append(population)
    return sizes


def estimate(hits: np.ndarray, tested: np.ndarray, population: int) -> np.ndarray:
    """The full-set score a window is reported with: its hits when it was tested on all ``population`` images,
    else its hits scaled to the whole set (rounded)."""
    hits = np.asarray(hits, dtype=np.int64)
    tested = np.asarray(tested, dtype=np.int64)
    scaled = np.rint(hits * (population / np.maximum(tested, 1))).astype(np.int64)
    return np.where(tested >= population, hits, scaled)


def kth_largest(values: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``values`` (``-inf`` when there are fewer than ``k``)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if k < 1 or v.size < k:
        return -math.inf
    return float(np.partition(v, v.size - k)[v.size - k])
