"""The recurrence test: windows that send the flip set to the same clusters form a group; random ones do not."""

from __future__ import annotations

import numpy as np

from poisonscan.detect.recurrence import destination_profiles, largest_group, profile_similarity, recurrence_test

N_FLIP, N_CLUSTERS = 200, 50


def _windows(rng: np.random.Generator, labels: np.ndarray, n: int, moved_share: float,
             target: int | None = None) -> np.ndarray:
    """``n`` windows' destinations: each moves ``moved_share`` of the flip images, to ``target`` (a trigger) or to
    clusters of its own (a random window: a few favourite clusters each)."""
    out = np.tile(labels, (n, 1))
    for w in range(n):
        moved = rng.random(N_FLIP) < moved_share
        if target is not None:
            out[w, moved] = target
        else:
            favourites = rng.choice(N_CLUSTERS, 3, replace=False)
            out[w, moved] = rng.choice(favourites, int(moved.sum()))
    return out


def test_destination_profiles_count_moved_images_by_cluster():
    labels = np.array([0, 0, 1, 1])
    dest = np.array([[5, 5, 1, 1],      # moves images 0, 1 to cluster 5
                     [5, 6, 1, 2],      # moves 0, 1, 3 to clusters 5, 6, 2
                     [0, 0, 1, 1]])     # moves nothing
    prof = destination_profiles(dest, labels, 8)
    assert prof[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 0] and prof[1].tolist() == [0, 0, 1, 0, 0, 1, 1, 0]
    sim = profile_similarity(prof)
    assert np.isclose(sim[0, 1], 1 / np.sqrt(3)) and np.isclose(sim[0, 0], 1.0)
    assert (sim[2] == 0).all() and (sim[:, 2] == 0).all()


def test_largest_group_is_centred_on_the_most_alike_window():
    sim = np.array([[1, .9, .9, 0], [.9, 1, .1, 0], [.9, .1, 1, 0], [0, 0, 0, 1]])
    assert largest_group(sim, 0.5) == (3, [0, 1, 2])
    assert largest_group(np.zeros((0, 0)), 0.5) == (0, [])


def test_trigger_windows_recur_and_random_windows_do_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLUSTERS, N_FLIP)
    labels[labels == 7] = 8                               # cluster 7 is the target: no flip image starts there
    null = _windows(rng, labels, 1024, 0.5)
    null_scores = (null != labels).sum(1)
    triggers = _windows(rng, labels, 12, 0.55, target=7)
    top = np.concatenate([triggers, _windows(rng, labels, 8, 0.6)])
    rec = recurrence_test(top, null, null_scores, labels, N_CLUSTERS, seed=0)
    assert rec["size"] >= 12 and set(rec["members"]) >= set(range(12))
    assert rec["p_value"] < 0.01 and rec["null_group_p99"] < 5

    clean = recurrence_test(_windows(rng, labels, 20, 0.6), null, null_scores, labels, N_CLUSTERS, seed=0)
    assert clean["size"] < 5 and clean["p_value"] > 0.05
