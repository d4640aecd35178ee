"""knn_vote: the one weighted k-NN vote behind the pretraining monitor and eval backdoor."""

from __future__ import annotations

import torch

from poisonscan.eval.knn import knn_vote
from poisonscan.ssl.trainer import knn_accuracy


def test_weights_decide_over_counts() -> None:
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    # two class-1 rows against one close class-0 row: exp(sim / 0.07) lets the close one win
    assert knn_vote(bank, labels, query, 2, k=3).tolist() == [0]
    # with a flat temperature the count wins
    assert knn_vote(bank, labels, query, 2, k=3, temperature=100.0).tolist() == [1]


def test_leave_one_out_and_chunks_agree() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (50,), generator=g)
    whole = knn_vote(feats, labels, feats, 3, k=5, exclude_self=True)
    chunked = knn_vote(feats, labels, feats, 3, k=5, exclude_self=True, chunk=7)
    assert torch.equal(whole, chunked)
    # without leave-one-out each row votes for itself first; k = 1 gives its own label
    assert torch.equal(knn_vote(feats, labels, feats, 3, k=1), labels)
    assert knn_accuracy(feats, labels, feats, labels, k=1) == 1.0
