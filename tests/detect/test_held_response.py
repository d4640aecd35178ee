"""The held picture's response test: a learned trigger's copies move the flip set more than alike windows do."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch

from poisonscan.detect.clustering import Clustering
from poisonscan.detect.fliptest import FlipTest
from poisonscan.detect.held_response import ALIKE_SHARE, held_response_test, response_pairs, sign_test_p
from poisonscan.detect.holders import best_boxes, window_matches
from poisonscan.detect.masking import cut_windows
from tests.detect.test_fliptest import BrightSpotEncoder, flip_images, fp32, toy_clustering


def test_the_sign_test_is_the_binomial_tail() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == pytest.approx(1 / 8)
    assert sign_test_p(5, 1) == pytest.approx((comb(6, 5) + comb(6, 6)) / 64)
    assert sign_test_p(0, 4) == 1.0
    assert sign_test_p(31, 3) < 1e-6 < sign_test_p(20, 15)


def test_pairs_take_an_alike_image_of_the_holders_cluster_that_holds_nothing() -> None:
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 4, n)
    labels[390:] = 9                                    # a cluster of holders only: they get no pair
    holds = np.zeros(n, bool)
    holds[:40] = holds[390:] = True
    similarity = rng.random(n)
    exclude = [40, 41, 42]
    holders, others = response_pairs(holds, similarity, labels, exclude, 25, seed=1)
    assert len(holders) == len(others) == 25 and len(set(holders.tolist())) == len(set(others.tolist())) == 25
    assert holds[holders].all() and not holds[others].any() and not np.isin(others, exclude).any()
    assert (labels[holders] == labels[others]).all() and (holders < 40).all()
    for h, o in zip(holders, others):
        pool = np.flatnonzero(~holds & (labels == labels[h]) & ~np.isin(np.arange(n), exclude))
        assert similarity[o] >= np.quantile(similarity[pool], 1 - ALIKE_SHARE)
    again = response_pairs(holds, similarity, labels, exclude, 25, seed=1)
    assert (again[0] == holders).all() and (again[1] == others).all()             # seeded
    every, _ = response_pairs(holds, similarity, labels, exclude, 100, seed=1)
    free = ~holds & ~np.isin(np.arange(n), exclude)
    alike = {c: int((similarity[free & (labels == c)] >= np.quantile(similarity[free & (labels == c)],
                                                                      1 - ALIKE_SHARE)).sum()) for c in range(4)}
    assert len(every) == sum(min(int((labels[:40] == c).sum()), alike[c]) for c in range(4))   # no image twice


def test_best_boxes_find_where_the_picture_is() -> None:
    rng = np.random.default_rng(3)
    images = torch.as_tensor(rng.integers(0, 40, (6, 3, 32, 32)), dtype=torch.uint8)
    picture = torch.as_tensor(rng.integers(0, 256, (3, 9, 9)), dtype=torch.uint8)
    where = [(0, 0), (23, 23), (5, 17), (11, 2), (20, 9), (14, 14)]
    for i, (x, y) in enumerate(where):
        images[i, :, y:y + 9, x:x + 9] = picture
    boxes = best_boxes(images, picture[None], fp32(), batch_size=4)
    assert boxes.tolist() == [[x, y, 9, 9] for x, y in where]
    big = torch.as_tensor(rng.integers(0, 40, (3, 3, 64, 64)), dtype=torch.uint8)      # shrunk to compare
    large = torch.as_tensor(rng.integers(0, 256, (3, 24, 24)), dtype=torch.uint8)
    spots = [(0, 0), (40, 40), (13, 30)]
    for i, (x, y) in enumerate(spots):
        big[i, :, y:y + 24, x:x + 24] = large
    got = best_boxes(big, large[None], fp32())
    assert (got[:, 2:] == 24).all()
    assert np.abs(got[:, :2].numpy() - np.array(spots)).max() <= 2


def _scan(picture: torch.Tensor, holders: int = 30, n: int = 400) -> tuple[FlipTest, torch.Tensor, np.ndarray]:
    """``n`` dim 16-px images, the first ``holders`` with ``picture`` (5 x 5) pasted; two clusters of store images,
    the flip test of the toy threat model (a bright spot flips its images)."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 40, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    for i in range(holders):
        x, y = (int(v) for v in torch.randint(0, 12, (2,), generator=g))
        images[i, :, y:y + 5, x:x + 5] = picture
    toy = toy_clustering()
    labels = np.arange(n) % 2
    clustering = Clustering(toy.centroids, labels, np.zeros(n, np.float32))
    flip = FlipTest(BrightSpotEncoder(), clustering, np.arange(64), flip_images(64), torch.ones(64, dtype=torch.int64),
                    fp32(), seed=3, rule="changed", batch_size=40)
    return flip, images, labels


def _checker(lo: int, hi: int) -> torch.Tensor:
    board = (torch.arange(5)[:, None] + torch.arange(5)[None, :]) % 2
    return (lo + (hi - lo) * board).to(torch.uint8).expand(3, 5, 5).clone()


@pytest.mark.parametrize("picture, responds", [(_checker(215, 255), True), (_checker(0, 60), False)])
def test_a_learned_picture_beats_alike_windows_and_one_the_model_ignores_does_not(picture, responds) -> None:
    flip, images, labels = _scan(picture)
    template = cut_windows(images[:1], best_boxes(images[:1], picture[None], fp32()))
    similarity = window_matches(images, template, fp32()).numpy()[:, 0]
    holds = similarity >= 0.99
    holds[0] = False                                                   # the group's own image
    assert holds.sum() == 29
    res = held_response_test(flip, images, template, holds, similarity, exclude=[0], n_pairs=20)
    assert res["pairs"] == 20 and res["wins"] + res["losses"] <= 20
    if responds:                                                       # a bright spot flips the whole flip set
        assert res["wins"] == 20 and res["holders_mean"] == 64 and res["others_mean"] == 0
        assert res["p_value"] == pytest.approx(0.5 ** 20)
    else:
        assert res["wins"] == res["losses"] == 0 and res["p_value"] == 1.0
    none = held_response_test(flip, images, template, np.zeros(len(images), bool), similarity, [0], 20)
    assert none["pairs"] == 0 and none["p_value"] == 1.0
