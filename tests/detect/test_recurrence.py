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
    alike = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert largest_group(alike) == (3, [0, 1, 2])
    assert largest_group(np.zeros((0, 0), dtype=bool)) == (0, [])


def _shifts(rng: np.random.Generator, n: int, direction: np.ndarray | None = None) -> np.ndarray:
    """Mean feature shifts: a shared part every strong window has, plus the trigger's direction or one of its own."""
    shared = np.full(32, 0.5)
    own = rng.normal(size=(n, 32)) if direction is None else direction + 0.05 * rng.normal(size=(n, 32))
    return shared + own


def test_trigger_windows_recur_and_random_windows_do_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLUSTERS, N_FLIP)
    labels[labels == 7] = 8                               # cluster 7 is the target: no flip image starts there
    null, null_shift = _windows(rng, labels, 1024, 0.5), _shifts(rng, 1024)
    null_scores = (null != labels).sum(1)
    direction = rng.normal(size=32)
    top = np.concatenate([_windows(rng, labels, 12, 0.55, target=7), _windows(rng, labels, 8, 0.6)])
    top_shift = np.concatenate([_shifts(rng, 12, direction), _shifts(rng, 8)])
    rec = recurrence_test(top, top_shift, null, null_shift, null_scores, labels, N_CLUSTERS, seed=0)
    assert rec["size"] >= 12 and set(rec["members"]) >= set(range(12))
    assert rec["p_value"] < 0.01 and rec["null_group_p99"] < 5

    clean = recurrence_test(_windows(rng, labels, 20, 0.6), _shifts(rng, 20), null, null_shift, null_scores, labels,
                            N_CLUSTERS, seed=0)
    assert clean["size"] < 5 and clean["p_value"] > 0.05


def test_few_clusters_still_tell_a_trigger_from_random_windows():
    """With 3 clusters every strong window sends the flip set to the same place: the feature shift decides."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, N_FLIP)
    null = np.where(rng.random((256, N_FLIP)) < 0.5, 2, labels)
    null_shift = _shifts(rng, 256)
    direction = rng.normal(size=32)
    top, top_shift = np.where(rng.random((5, N_FLIP)) < 0.6, 2, labels), _shifts(rng, 5, direction)
    rec = recurrence_test(top, top_shift, null, null_shift, (null != labels).sum(1), labels, 3, seed=0)
    assert rec["size"] == 5 and rec["bar_clusters"] > 0.99 and rec["p_value"] < 0.01
    rec = recurrence_test(top, _shifts(rng, 5), null, null_shift, (null != labels).sum(1), labels, 3, seed=0)
    assert rec["size"] < 3
