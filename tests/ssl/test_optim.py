"""Trainer building blocks: schedule, data order, optimisers, RNG state, k-NN."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from poisonscan.errors import UsageError
from poisonscan.ssl.trainer import (LARS, build_optimizer, epoch_batches, knn_accuracy, lr_at, resolve_optimizer,
                                    rng_state, set_rng_state, step_generator)


def test_warmup_then_cosine() -> None:
    peak, total, warm = 1.0, 100, 10
    assert lr_at(0, total, warm, peak) == pytest.approx(0.1)
    assert lr_at(9, total, warm, peak) == pytest.approx(1.0)
    assert lr_at(10, total, warm, peak) == pytest.approx(1.0)
    assert lr_at(55, total, warm, peak) == pytest.approx(0.5)
    assert lr_at(100, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 10, 0, 2.0) == pytest.approx(2.0)


def test_epoch_batches_shard_without_loss_or_overlap() -> None:
    n, batch, world = 23, 8, 2
    shards = [epoch_batches(n, batch, epoch=3, seed=1, rank=r, world=world) for r in range(world)]
    assert all(len(s) == n // batch for s in shards)                   # last incomplete batch dropped
    assert all(len(b) == batch // world for s in shards for b in s)
    seen = torch.cat([b for s in shards for b in s])
    assert len(set(seen.tolist())) == len(seen) == (n // batch) * batch
    single = epoch_batches(n, batch, epoch=3, seed=1)
    for step in range(n // batch):                                     # the ranks split the same global batches
        assert torch.equal(torch.cat([shards[0][step], shards[1][step]]), single[step])
    assert not torch.equal(torch.cat(single), torch.cat(epoch_batches(n, batch, epoch=4, seed=1)))


def test_step_generator_is_stateless() -> None:
    a = torch.rand(4, generator=step_generator(0, 5, 0))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 0)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 1)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 6, 0)))


def test_rng_state_round_trip_is_weights_only_safe(tmp_path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_optimisers_and_decay_groups() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert resolve_optimizer("auto", "vit_small_patch16_224") == "adamw"
    assert resolve_optimizer("auto", "resnet18") == "sgd"
    with pytest.raises(UsageError):
        resolve_optimizer("adam", "resnet18")
    sgd = build_optimizer(model, "sgd", 0.1)
    assert sgd.param_groups[0]["nesterov"] and [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    assert len(sgd.param_groups[0]["params"]) == 1                       # only the Linear weight is decayed
    assert isinstance(build_optimizer(model, "adamw", 0.1), torch.optim.AdamW)


def test_lars_trust_ratio_and_no_adaptation_for_biases() -> None:
    w = nn.Parameter(torch.full((2, 2), 2.0))
    b = nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.5)
    opt.step()
    # weight update = lr * trust * |w| / |g| * g = 0.001 * 4 / 1 * 0.5
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 2.0 - 0.002))
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.5))         # plain SGD for 1-d parameters


def test_knn_accuracy_weighted_vote() -> None:
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]]), dim=1)
    assert knn_accuracy(bank, labels, query, torch.tensor([0, 1, 1]), k=3) == 1.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1, 1, 0]), k=3) == pytest.approx(1 / 3)
