"""Contrastive losses: MoCo v3 InfoNCE and SimCLR NT-Xent, global over ranks under torch.distributed.

Both work unchanged without torch.distributed (plain batch losses). Under DDP the negatives come from every rank:
NT-Xent gathers with gradient (each rank gets the exact gradient of the global loss for its own embeddings),
InfoNCE gathers the momentum keys, which carry no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks, keeping the autograd graph."""
    return _GatherWithGrad.apply(x) if _distributed() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks, detached."""
    if not _distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class InfoNCE(nn.Module):
    """MoCo v3 contrastive loss: queries ``q`` against the keys ``k`` of every rank.

    ``loss = 2 T * CE(q k^T / T, labels)`` with labels offset by ``rank * N``, as in MoCo v3.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q.float(), dim=1)
        k = gather_no_grad(F.normalize(k.float(), dim=1))
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * _rank()
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


class NTXent(nn.Module):
    """SimCLR's normalised temperature-scaled cross entropy over the 2N views (2N x 2N, or 2N x 2NW under DDP)."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)       # local 2n rows: view 1 then view 2
        keys = gather_with_grad(z)                                        # rank r's rows at [2n r, 2n (r + 1))
        logits = z @ keys.t() / self.temperature
        offset = 2 * n * _rank()
        rows = torch.arange(2 * n, device=z.device)
        logits[rows, rows + offset] = float("-inf")                      # not itself
        positives = (rows + n) % (2 * n) + offset                        # the other view of the same image
        return F.cross_entropy(logits, positives)
