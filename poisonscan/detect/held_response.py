"""Does the threat model respond to the held picture? Its copies against windows alike to it, pair by pair.

The held-picture test (detect/holders.py) finds a picture that many images hold, but not that the threat model
learned it: the gate asks the top-k windows to stand above random ones too, and a weakly learned trigger's few top-k
windows may not (tinyimagenet100 at 1% with an 8-epoch model: 495 images hold the picture, the top-k stand above
random windows at p 0.038 only). The picture's many copies say more than the top-k's few. Each of up to ``n_pairs``
holders (drawn at random) is paired with an image of the same cluster that does not hold the picture, is not a top-k
image, is the other of no other pair, and whose best match to it is among the :data:`ALIKE_SHARE` most alike of those;
each gives the window where it best matches the group's windows (the holder's copy; in the other image the window most
alike to it), and the two windows are scored on the flip test with the same paste positions, toward their cluster
(:meth:`~poisonscan.detect.fliptest.FlipTest.scores`). A learned trigger moves more flip-set images than an alike
window of an image of the same cluster; a picture the threat model does not respond to wins and loses about equally.
The statistic is the one-sided sign test on the pairs that differ (:func:`sign_test_p`). Cluster and window kind are
matched, so neither a potent cluster (the search's later rounds favour them) nor a high-contrast window (which moves
more than a flat one) wins by itself. Measured on that run's threat model with the natural pictures its random
reference windows' holders share (16 pictures, 5-19 holders each): paired with the window at the holder's own position
they won 11 of 13 decided pairs (8 pictures), with the most alike window of any image of the cluster 20 of 31, with
the :data:`ALIKE_SHARE` most alike 20 of 35 (p 0.25), while the trigger's copies won 31 of 34 (64 pairs, p 4e-7).
Costs ``2 x n_pairs`` windows on the flip set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poisonscan.detect.fliptest import FlipTest
from poisonscan.detect.holders import best_boxes
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.seeds import derive_seed

#: the other image of a pair is drawn from the cluster's images whose best match to the picture is among this
#: share of the most alike (the upper decile; a convention, chosen with the figures above on one run)
ALIKE_SHARE = 0.1


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: the chance of at least ``wins`` of ``wins + losses`` fair coin tosses (1.0 with
    no decided pair)."""
    n = int(wins) + int(losses)
    if n == 0:
        return 1.0
    return sum(math.comb(n, j) for j in range(int(wins), n + 1)) / 2 ** n


def response_pairs(holds: np.ndarray, similarity: np.ndarray, labels: np.ndarray, exclude: list[int],
                   n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_pairs`` holders drawn at random (``holds``: bool per image) and, for each, an image of its cluster
    (``labels``) that holds nothing, is not in ``exclude`` and whose ``similarity`` (best match to the picture) is
    among the :data:`ALIKE_SHARE` highest of those, drawn at random without replacement, so no image is the other of
    two pairs; holders whose cluster has none left are passed over. ``(holders, others)``, int64, from
    ``(seed, "held response")``."""
    holds = np.asarray(holds, dtype=bool)
    labels, similarity = np.asarray(labels), np.asarray(similarity, dtype=np.float64)
    rng = np.random.default_rng(derive_seed(seed, "held response"))
    free = ~holds
    free[np.asarray(exclude, dtype=np.int64)] = False
    alike: dict[int, list[int]] = {}                    # each cluster's alike images not yet paired, shuffled
    holders: list[int] = []
    others: list[int] = []
    for i in rng.permutation(np.flatnonzero(holds)):
        if len(holders) >= n_pairs:
            break
        c = int(labels[i])
        if c not in alike:
            pool = np.flatnonzero(free & (labels == c))
            if len(pool):
                pool = pool[similarity[pool] >= np.quantile(similarity[pool], 1.0 - ALIKE_SHARE)]
            alike[c] = rng.permutation(pool).tolist()
        if alike[c]:
            holders.append(int(i))
            others.append(int(alike[c].pop()))
    return np.asarray(holders, dtype=np.int64), np.asarray(others, dtype=np.int64)


def held_response_test(flip: FlipTest, images_u8: Tensor, templates_u8: Tensor, holds: np.ndarray,
                       similarity: np.ndarray, exclude: list[int], n_pairs: int) -> dict[str, Any]:
    """The paired test of the module's docstring on the picture of ``templates_u8`` (the held group's windows),
    held by the images ``holds`` marks (``similarity``: every image's best match to it; ``exclude``: images never
    drawn as the other of a pair, the top-k). Returns
    ``pairs``, ``wins`` and ``losses`` (pairs whose holder's window moved more, fewer flip-set images), the two
    sides' mean scores (``holders_mean``, ``others_mean``) and ``p_value``."""
    labels = np.asarray(flip.clustering.labels)
    holders, others = response_pairs(holds, similarity, labels, exclude, n_pairs, flip.seed)
    if len(holders) == 0:
        return {"pairs": 0, "wins": 0, "losses": 0, "holders_mean": 0.0, "others_mean": 0.0, "p_value": 1.0}
    size = int(images_u8.shape[-1])
    rows = torch.as_tensor(np.concatenate([holders, others]))
    if int(templates_u8.shape[-1]) > size:
        raise ValueError("the held group's windows are larger than the images")
    picked = images_u8[rows]
    boxes = best_boxes(picked, templates_u8, flip.runtime, flip.batch_size)
    windows = cut_windows(picked, boxes)
    sources = labels[np.concatenate([holders, holders])]             # both toward the holder's cluster
    mine = flip.scores(windows[:len(holders)], sources[:len(holders)], "held response")
    theirs = flip.scores(windows[len(holders):], sources[len(holders):], "held response")
    wins, losses = int((mine > theirs).sum()), int((mine < theirs).sum())
    return {"pairs": int(len(holders)), "wins": wins, "losses": losses, "holders_mean": float(mine.mean()),
            "others_mean": float(theirs.mean()), "p_value": sign_test_p(wins, losses)}
