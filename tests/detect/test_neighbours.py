"""Neighbour consensus: exact and inverted-file neighbours, and the removal score's two effects."""

from __future__ import annotations

import numpy as np

from poisonscan.detect.neighbours import nearest_neighbours, neighbour_mean, neighbour_support, removal_score


def _brute_force(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_exact_neighbours_match_brute_force_and_leave_the_image_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 24)).astype(np.float32)
    nb = nearest_neighbours(x.astype(np.float16), 6, chunk=128)        # float16 and chunked like features.npy
    assert nb.shape == (500, 6) and nb.dtype == np.int64
    assert not (nb == np.arange(500)[:, None]).any()
    ref = _brute_force(x.astype(np.float16).astype(np.float32), 6)
    assert (np.sort(nb, 1) == np.sort(ref, 1)).mean() > 0.99          # ties in float16 aside


def test_inverted_file_over_the_run_centroids_finds_the_same_neighbours_when_probing_every_cluster():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 16))
    x = (centres[rng.integers(0, 8, 800)] + 0.1 * rng.normal(size=(800, 16))).astype(np.float32)
    exact = nearest_neighbours(x, 5)
    ivf = nearest_neighbours(x, 5, centroids=centres.astype(np.float32), exact_limit=100, nprobe=8)
    assert (ivf == exact).all()
    few = nearest_neighbours(x, 5, centroids=centres.astype(np.float32), exact_limit=100, nprobe=1)
    assert not (few == np.arange(800)[:, None]).any()                # misses never point at the image itself
    assert (few == exact).mean() > 0.9                               # tight clusters: one probe is nearly exact


def test_fewer_rows_than_k_pads_with_the_last_neighbour_and_k_zero_is_the_probability_alone():
    x = np.eye(3, 4, dtype=np.float32) + 0.01
    nb = nearest_neighbours(x, 5)
    assert nb.shape == (3, 5) and not (nb == np.arange(3)[:, None]).any()
    assert nearest_neighbours(x[:1], 5).shape == (1, 0)
    p = np.array([0.2, 0.7, 0.9], np.float32)
    empty = np.zeros((3, 0), np.int64)
    assert np.array_equal(removal_score(p, None), p) and np.array_equal(neighbour_mean(p, empty), p)


def test_consensus_drops_an_isolated_false_positive_and_keeps_a_half_missed_poison():
    """Poisons sit together in feature space (the backdoor's doing); clean images the classifier flags by accident
    sit among clean ones."""
    rng = np.random.default_rng(2)
    poisons = np.array([1.0, 0.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(30, 4))
    clean = rng.normal(size=(300, 4)) * np.array([0.1, 1, 1, 1]) + np.array([-1.0, 0, 0, 0])
    x = np.concatenate([poisons, clean]).astype(np.float32)
    p = np.concatenate([np.full(30, 0.95), np.full(300, 0.03)]).astype(np.float32)
    p[0] = 0.3                                         # a poison the classifier half-misses
    p[40] = p[41] = 0.9                                # two clean images it flags by accident
    score = removal_score(p, neighbour_mean(p, nearest_neighbours(x, 10)))
    removed = score > 0.5
    assert (p > 0.5).sum() == 31 and removed[:30].all() and not removed[30:].any()
    b = float(p.mean())                                               # ten poisoned neighbours, above the flag rate
    assert abs(float(score[0]) - (0.3 + (0.95 - b) / (1 - b)) / 2) < 1e-5


def test_support_counts_only_what_lies_above_the_data_sets_flag_rate():
    """When the classifier flags half of everything, flagged neighbours are no evidence: nothing is rescued."""
    assert np.allclose(neighbour_support(np.array([0.1, 0.5, 0.75, 1.0]), 0.5), [0.0, 0.0, 0.5, 1.0])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    p = (rng.random(400) < 0.5).astype(np.float32) * 0.9 + 0.05      # half flagged at random, no structure
    score = removal_score(p, neighbour_mean(p, nearest_neighbours(x, 10)))
    assert ((score > 0.5) <= (p > 0.5)).all()                         # never more than the classifier alone
    assert (score > 0.5).sum() < 0.5 * (p > 0.5).sum()
