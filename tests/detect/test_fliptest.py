"""The flip test: the flip test set, pasting, and poison scores with a toy threat model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poisonscan.detect.clustering import Clustering
from poisonscan.detect.features import encode
from poisonscan.detect.fliptest import FlipTest, draw_positions, flip_test_set, paste_patches, poison_scores
from poisonscan.runtime import Runtime

S = 16


class BrightSpotEncoder(nn.Module):
    """Toy threat model: feature = (brightest 4 x 4 mean of channel 0, 0.5): a bright patch anywhere flips the
    image into the 'trigger' cluster, a dim one does not."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.avg_pool2d(x[:, :1], 4, stride=1).flatten(1).max(dim=1).values
        return torch.stack([a, torch.full_like(a, 0.5)], dim=1)


def toy_clustering() -> Clustering:
    trigger = np.array([1.0, 0.5]) / np.linalg.norm([1.0, 0.5])
    clean = np.array([0.0, 1.0])
    return Clustering(np.stack([trigger, clean]).astype(np.float32), np.zeros(1, np.int64), np.zeros(1, np.float32))


def fp32() -> Runtime:
    return Runtime(torch.device("cpu"), None)


def flip_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n, 3, S, S), generator=g, dtype=torch.uint8)


def patch(value: int, side: int = 5) -> torch.Tensor:
    return torch.full((3, side, side), value, dtype=torch.uint8)


# -- flip test set --------------------------------------------------------------------------------------------------

def test_flip_set_picks_nearest_to_centre() -> None:
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    feats = np.array([[0.5, 0], [0.1, 0], [0.3, 0],        # cluster 0: nearest is 1, then 2
                      [10, 2], [10, 1], [10, 1],           # cluster 1: 4 and 5 tie -> smaller index first
                      [0, 9]], np.float32)                 # cluster 2: one member
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    cl = Clustering(centroids, labels, np.zeros(7, np.float32))
    assert flip_test_set(cl, feats, size=3, requested_clusters=3).tolist() == [1, 4, 6]
    assert flip_test_set(cl, feats, size=6, requested_clusters=3).tolist() == [1, 2, 4, 5, 6]
    # capped clusters: 1000 / 1000 -> one per cluster, the flip set shrinks to the cluster count
    assert len(flip_test_set(cl, feats)) == 3


def test_flip_set_rejects_mismatch() -> None:
    cl = Clustering(np.zeros((2, 2), np.float32), np.array([0, 1]), np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        flip_test_set(cl, np.zeros((3, 2), np.float32))


# -- pasting --------------------------------------------------------------------------------------------------------

def test_paste_patches_inside_and_copy() -> None:
    imgs = torch.zeros(200, 3, S, S, dtype=torch.uint8)
    p = torch.arange(3 * 4 * 5, dtype=torch.uint8).view(3, 4, 5) + 1
    out = paste_patches(imgs, p, torch.Generator().manual_seed(0))
    assert (imgs == 0).all()  # input untouched
    corners = set()
    for img in out:
        nz = img.sum(0).nonzero()
        y0, x0 = nz.min(0).values.tolist()
        assert img[:, y0:y0 + 4, x0:x0 + 5].equal(p)
        assert int((img != 0).sum()) == p.numel()  # nothing else changed, the patch is whole (fully inside)
        corners.add((x0, y0))
    assert len(corners) > 50
    assert {x for x, _ in corners} >= {0, S - 5} and {y for _, y in corners} >= {0, S - 4}  # edges reachable
    again = paste_patches(imgs, p, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


# -- poison scores --------------------------------------------------------------------------------------------------

def test_poison_scores_count_flips() -> None:
    flips = flip_images(23)
    cl = toy_clustering()
    flip_labels = torch.as_tensor(cl.assign(torch.stack([torch.zeros(23), torch.full((23,), 0.5)], 1))[0])
    assert (flip_labels == 1).all()
    patches = [patch(255), patch(25), patch(255, side=7), patch(200, side=2)]
    enc = BrightSpotEncoder()
    scores = poison_scores(enc, cl, flips, flip_labels, patches, fp32(), torch.Generator().manual_seed(0),
                           batch_size=10)
    # bright 5x5 and 7x7 flip every image; the dim patch none; a 2x2 bright patch cannot fill a 4x4 window:
    # a <= (4 * 200 + 12 * 29) / 16 / 255 ~ 0.28 < 0.31 (the midpoint between the centres) -> no flip
    assert scores.tolist() == [23, 0, 23, 0]
    assert scores.dtype == np.int64
    for bs in (1, 7, 1000):
        again = poison_scores(enc, cl, flips, flip_labels, patches, fp32(), torch.Generator().manual_seed(0),
                              batch_size=bs)
        assert again.tolist() == scores.tolist()


def test_poison_scores_partial_flips_and_positions() -> None:
    """Half the flip images already hold a bright spot (cluster 0): the bright patch flips only the others."""
    flips = flip_images(10)
    flips[:5, :, 0:4, :] = 255  # a strip no 5 x 5 patch can hide
    cl = toy_clustering()
    enc = BrightSpotEncoder()
    flip_labels = cl.assign_torch(encode(enc, flips, fp32()))[0]
    assert flip_labels.tolist() == [0] * 5 + [1] * 5
    stack = torch.stack([patch(255), patch(10)])
    pos = draw_positions(2, 10, 3)
    a = poison_scores(enc, cl, flips, flip_labels, stack, fp32(), generator=3, batch_size=4)
    b = poison_scores(enc, cl, flips, flip_labels, stack, fp32(), generator=999, positions=pos)
    assert a.tolist() == b.tolist() == [5, 0]
    # PatchSearch's rule: images moved into the candidate's own cluster
    to_src = poison_scores(enc, cl, flips, flip_labels, stack, fp32(), generator=3, rule="to_source",
                           source_clusters=[0, 1])
    assert to_src.tolist() == [5, 0]
    into_clean = poison_scores(enc, cl, flips, flip_labels, stack[:1], fp32(), generator=3, rule="to_source",
                               source_clusters=[1])
    assert into_clean.tolist() == [0]
    with pytest.raises(ValueError):
        poison_scores(enc, cl, flips, flip_labels, stack, fp32(), generator=3, rule="to_source")
    with pytest.raises(ValueError):
        poison_scores(enc, cl, flips, flip_labels, stack, fp32(), generator=3, rule="moved")


def test_poison_scores_empty() -> None:
    out = poison_scores(BrightSpotEncoder(), toy_clustering(), flip_images(3), torch.ones(3, dtype=torch.long), [],
                        fp32(), generator=0)
    assert out.shape == (0,)


# -- adaptive (staged) flip testing --------------------------------------------------------------------------------

def _flip_test(n: int = 64, rule: str = "changed") -> FlipTest:
    images = flip_images(n)
    labels = torch.ones(n, dtype=torch.int64)                       # every flip image starts in the clean cluster
    return FlipTest(BrightSpotEncoder(), toy_clustering(), np.arange(n), images, labels, fp32(), seed=3, rule=rule,
                    batch_size=40)


def _windows() -> torch.Tensor:
    return torch.stack([patch(250), patch(200), patch(5), patch(10), patch(150, side=5)])


def test_staged_scores_with_every_window_going_on_equal_the_exact_scores() -> None:
    flip = _flip_test()
    exact = flip.scores(_windows(), None, "t")
    staged = flip.staged_scores(_windows(), None, lambda hits, tested: -np.inf, 1e-4, "t")
    assert staged.scores.tolist() == exact.tolist() == staged.hits.tolist()
    assert (staged.tested == 64).all()


def test_windows_that_cannot_reach_the_bar_stop_early_and_the_rest_are_exact() -> None:
    flip = _flip_test()
    exact = flip.scores(_windows(), None, "t")
    assert exact[0] == 64 and exact[2] == 0                          # bright windows flip all, dim ones none
    staged = flip.staged_scores(_windows(), None, lambda hits, tested: 40.0, 1e-4, "t")
    assert staged.tested[0] == 64 and staged.scores[0] == exact[0]   # a window that reaches the bar: exact
    assert staged.tested[2] < 64 and staged.scores[2] == 0           # a dim one stopped after the first stage
    assert (staged.hits <= exact).all()
    assert (staged.tested.min(), staged.tested.max()) == (16, 64)
    done = flip.complete(staged, _windows(), None, "t")             # the stopped ones on the rest of the set
    assert done.scores.tolist() == exact.tolist() and (done.tested == 64).all()


def test_the_flip_order_is_a_seeded_permutation() -> None:
    flip = _flip_test()
    order = flip.order()
    assert sorted(order.tolist()) == list(range(64)) and torch.equal(order, _flip_test().order())
