"""InfoNCE / NT-Xent: hand-computed values, symmetry, and the 2-process all-gather (gloo, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from poisonscan.ssl.losses import InfoNCE, NTXent


def _ntxent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's definition written out row by row."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    total = torch.zeros(())
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        den = sum(torch.exp(z[i] @ z[j] / t) for j in range(n2) if j != i)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / t) / den)
    return total / n2


def test_ntxent_closed_form() -> None:
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    z = torch.cat([e1, e2])
    # each row: positive sim 1, two negatives with sim 0 -> log(1 + 2 e^{-1/T})
    assert math.isclose(float(NTXent(0.5)(z, z)), math.log(1 + 2 * math.exp(-2)), rel_tol=1e-6)


def test_ntxent_matches_loop_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss = NTXent(0.2)(z1, z2)
    torch.testing.assert_close(loss, _ntxent_loop(z1, z2, 0.2))
    torch.testing.assert_close(loss, NTXent(0.2)(z2, z1))


def test_infonce_closed_form_and_manual() -> None:
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = 0.25
    expected = 2 * t * math.log(1 + math.exp(-1 / t))       # MoCo v3 scales the cross entropy by 2T
    assert math.isclose(float(InfoNCE(t)(q, q)), expected, rel_tol=1e-5)
    g = torch.Generator().manual_seed(1)
    q1, q2, k1, k2 = (torch.randn(4, 6, generator=g) for _ in range(4))
    loss = InfoNCE(0.2)
    logits = F.normalize(q1, dim=1) @ F.normalize(k2, dim=1).t() / 0.2
    manual = -torch.log_softmax(logits, dim=1).diagonal().mean() * 0.4
    torch.testing.assert_close(loss(q1, k2), manual)
    # scale-invariant in both arguments (cosine similarities), labels are the diagonal
    torch.testing.assert_close(loss(3 * q1, 0.5 * k2), manual)
    # a permutation applied to both queries and keys keeps every positive pair: same loss
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(loss(q1[perm], k2[perm]), manual)


def test_gradients_flow_to_both_views() -> None:
    z1 = torch.randn(4, 5, requires_grad=True)
    z2 = torch.randn(4, 5, requires_grad=True)
    NTXent(0.2)(z1, z2).backward()
    assert z1.grad is not None and z2.grad is not None and z1.grad.abs().sum() > 0


def _worker(rank: int, world: int, init: str, z1: torch.Tensor, z2: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n = z1.shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    a, b = z1[part].clone().requires_grad_(), z2[part].clone().requires_grad_()
    loss = NTXent(0.3)(a, b)
    loss.backward()
    info = InfoNCE(0.3)(q[part], k[part])
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad, "info": info}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_equals_one_big_batch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2, q, k = (torch.randn(6, 4, generator=g) for _ in range(4))
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", z1, z2, q, k, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    # the global loss is the mean of the ranks' losses; each rank gets the exact gradient of the sum of losses
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = NTXent(0.3)(a, b)
    full.backward()
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, full.detach())
    torch.testing.assert_close(torch.cat([r[0]["ga"], r[1]["ga"]]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([r[0]["gb"], r[1]["gb"]]) / 2, b.grad)
    torch.testing.assert_close((r[0]["info"] + r[1]["info"]) / 2, InfoNCE(0.3)(q, k))
