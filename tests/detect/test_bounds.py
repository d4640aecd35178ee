"""Sequential flip testing's bound: the hypergeometric upper bound, the stages, the estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from poisonscan.detect.bounds import estimate, hypergeom_upper, kth_largest, stage_sizes


def test_the_bound_holds_for_all_but_delta_of_the_samples() -> None:
    rng = np.random.default_rng(0)
    for total, hits_in_set, tested, delta in [(100, 20, 25, 0.01), (400, 12, 50, 0.05), (1000, 150, 125, 0.01)]:
        pop = np.zeros(total, np.int64)
        pop[:hits_in_set] = 1
        seen = np.array([rng.permutation(pop)[:tested].sum() for _ in range(4000)])
        bound = hypergeom_upper(seen, tested, total, delta)
        assert (bound < hits_in_set).mean() <= delta                  # fails for at most delta of the draws
        assert (bound >= seen).all() and (bound <= total - tested + seen).all()   # never below what was seen


def test_the_bound_by_hand_and_when_everything_was_tested() -> None:
    # 0 hits in 1 draw of 2: K = 1 leaves P(0 hits) = 1/2 > 0.4, K = 2 gives 0
    assert hypergeom_upper(np.array([0]), 1, 2, 0.4).tolist() == [1]
    assert hypergeom_upper(np.array([0]), 1, 2, 0.6).tolist() == [0]
    assert hypergeom_upper(np.array([3, 7]), 10, 10, 1e-4).tolist() == [3, 7]     # whole set: exact
    tight, loose = hypergeom_upper(np.array([2]), 50, 100, 0.1), hypergeom_upper(np.array([2]), 50, 100, 1e-4)
    assert tight[0] < loose[0]                                                     # a smaller error costs more
    with pytest.raises(ValueError):
        hypergeom_upper(np.array([0]), 1, 10, 0.0)


def test_stages_grow_to_the_whole_flip_set() -> None:
    assert stage_sizes(1000) == [125, 250, 500, 1000]
    assert stage_sizes(100) == [16, 25, 50, 100]
    assert stage_sizes(20) == [16, 20]
    assert stage_sizes(10) == [10]


def test_estimates_and_order_statistics() -> None:
    assert estimate(np.array([3, 5, 1]), np.array([100, 25, 50]), 100).tolist() == [3, 20, 2]
    assert kth_largest(np.array([5, 1, 9, 7]), 2) == 7
    assert kth_largest(np.array([5]), 2) == -math.inf
