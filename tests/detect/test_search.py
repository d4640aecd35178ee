"""Poisonous image search: the iterative cluster search, the top-k, and the masks a ViT search uses."""

from __future__ import annotations

import numpy as np
import pytest

from poisonscan.detect.masking import EVERY_POSITION, CoarseToFine
from poisonscan.detect.search import (SearchSettings, iterative_search, masking_window, masks_per_image, token_patch,
                                      token_plan, top_k)
from poisonscan.models import create_encoder

# -- iterative search -----------------------------------------------------------------------------------------------

def _labels() -> np.ndarray:
    # clusters 0..4 with 10 images each, cluster 5 with 3 images (exhausted in round 2)
    return np.concatenate([np.repeat(np.arange(5), 10), np.full(3, 5)])


def _score_table(labels: np.ndarray) -> np.ndarray:
    # cluster c's images score c (cluster 5 scores highest but runs out of images)
    rng = np.random.default_rng(0)
    return labels * 10 + rng.integers(0, 3, size=labels.shape[0])


class Scorer:
    def __init__(self, table: np.ndarray) -> None:
        self.table, self.calls = table, []

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        self.calls.append(idx.copy())
        return self.table[idx]


def test_iterative_search_drops_lowest_and_terminates() -> None:
    labels = _labels()
    scorer = Scorer(_score_table(labels))
    res = iterative_search(labels, scorer, samples_per_cluster=2, drop_fraction=0.25, generator=0)
    # round 1: 6 live -> none exhausted, drop int(0.25 * 6) = 1 (cluster 0)
    # round 2: 5 live -> cluster 5 exhausted (3 images) and retired, drop 1 of the 4 others (cluster 1)
    # then 3 -> 2 -> 1 -> 0 live clusters, dropping the lowest each time
    assert [r["live_clusters"] for r in res.rounds] == [6, 5, 3, 2, 1]
    assert [r["scored"] for r in res.rounds] == [12, 9, 6, 4, 2]
    assert [r["retired"] for r in res.rounds] == [0, 1, 0, 0, 1]  # cluster 4 has run out of images in round 5
    assert [r["dropped"] for r in res.rounds] == [1, 1, 1, 1, 0]
    scored_by_cluster = np.bincount(labels[list(res.scores)], minlength=6)
    assert scored_by_cluster.tolist() == [2, 4, 6, 8, 10, 3]  # the poisonous cluster is scored the most
    # every computed score is kept, each image scored once, one score_fn call per round
    assert len(scorer.calls) == 5
    assert sorted(np.concatenate(scorer.calls).tolist()) == sorted(res.scores)
    assert len(res.order) == len(set(res.order)) == 33
    assert all(res.scores[i] == scorer.table[i] for i in res.scores)
    assert res.cluster_scores[4] == float(scorer.table[labels == 4].sum())  # all 10 images of cluster 4 scored
    assert res.to_dict()["scored"][0] == [res.order[0], res.scores[res.order[0]]]


def test_iterative_search_reproducible_and_seeded() -> None:
    labels = _labels()
    table = _score_table(labels)
    a = iterative_search(labels, Scorer(table), generator=7)
    b = iterative_search(labels, Scorer(table), generator=np.random.default_rng(7))
    c = iterative_search(labels, Scorer(table), generator=8)
    assert a.order == b.order and a.scores == b.scores and a.rounds == b.rounds
    assert a.order != c.order


def test_iterative_search_resumes_after_kill() -> None:
    labels = _labels()
    table = _score_table(labels)
    full = iterative_search(labels, Scorer(table), generator=1)

    saved: dict[int, int] = {}

    class Killed(Exception):
        pass

    def checkpoint(res) -> None:
        saved.clear()
        saved.update(res.scores)
        if len(res.rounds) == 2:
            raise Killed

    with pytest.raises(Killed):
        iterative_search(labels, Scorer(table), generator=1, on_round=checkpoint)
    assert len(saved) == 21
    scorer = Scorer(table)
    resumed = iterative_search(labels, scorer, generator=1, already_scored=saved)
    assert resumed.order == full.order and resumed.scores == full.scores
    assert [r["scored"] for r in resumed.rounds] == [r["scored"] for r in full.rounds]
    assert [r["computed"] for r in resumed.rounds] == [0, 0, 6, 4, 2]
    computed = np.concatenate(scorer.calls).tolist()
    assert not set(computed) & set(saved)  # nothing scored twice


def test_iterative_search_max_aggregate_and_stop() -> None:
    labels = np.repeat(np.arange(4), 4)
    table = np.zeros(16, np.int64)
    table[0] = 100  # one very poisonous image in cluster 0, the others score 1 each
    table[4:] = 1
    res_sum = iterative_search(labels, lambda i: table[i], samples_per_cluster=4, drop_fraction=0.5, generator=0)
    res_max = iterative_search(labels, lambda i: table[i], samples_per_cluster=1, drop_fraction=0.5, generator=0,
                               aggregate="max", stop_below=3)
    assert res_sum.rounds[0]["retired"] == 4  # every cluster exhausted after one round of 4
    assert len(res_max.rounds) == 1  # 4 live -> drop 2 -> 2 < stop_below
    with pytest.raises(ValueError):
        iterative_search(labels, lambda i: table[i], aggregate="mean")
    with pytest.raises(ValueError):
        iterative_search(labels, lambda i: table[i][:1], generator=0)


def test_top_k_ties_by_index() -> None:
    scores = {5: 3, 2: 3, 9: 7, 1: 0, 4: 3}
    assert top_k(scores, 3) == [9, 2, 4]
    assert top_k(scores, 10) == [9, 2, 4, 5, 1]
    assert top_k({}, 5) == []


def test_token_plans_by_grid_and_budget() -> None:
    s = SearchSettings()
    assert token_plan(s, 9, 32, 4) is EVERY_POSITION and masks_per_image(s, 8, 32, 4) == 64     # 8 x 8 grid
    assert isinstance(token_plan(s, 60, 224, 16), CoarseToFine) and masks_per_image(s, 64, 224, 16) == 49 + 9
    exact = SearchSettings(masking="exact")
    assert token_plan(exact, 60, 224, 16) is EVERY_POSITION and masks_per_image(exact, 64, 224, 16) == 196
    few = SearchSettings(masks=40)
    assert token_plan(few, 9, 32, 4) is None and masks_per_image(few, 8, 32, 4) == 40          # the B shared masks
    vit, cnn = create_encoder("vit_tiny_p4", depth=1), create_encoder("resnet18", 32)
    assert (token_patch(s, vit), token_patch(s, cnn)) == (4, 0)
    assert token_patch(SearchSettings(vit_masking="zero"), vit) == token_patch(SearchSettings(method="patchsearch"),
                                                                               vit) == 0
    assert (masking_window(s, vit, 9, 32), masking_window(s, cnn, 9, 32)) == (8, 9)
    assert masking_window(s, vit, 11, 32) == 12 and masking_window(s, vit, 1, 32) == 4          # whole tokens
