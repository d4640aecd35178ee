"""The weighted k-NN vote on L2-normalised features: the classifier behind k-NN accuracy and k-NN ASR.

Each query's ``k`` most similar bank rows (cosine) vote for their label with weight ``exp(sim / T)`` (InstDisc's
monitor, the SSL literature's k-NN evaluation). The pretraining monitor and ``eval backdoor`` both use this one vote.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_vote(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, n_classes: int, k: int = 20,
             temperature: float = 0.07, exclude_self: bool = False, chunk: int = 1024) -> torch.Tensor:
    """The voted class of each query row (int64, on the bank's device).

    ``exclude_self``: query row ``i`` never votes with bank row ``i`` (leave-one-out when the bank is the query set
    itself). ``k`` is capped at the bank rows available; the caller makes sure at least one is.
    """
    if exclude_self and query.shape[0] > bank.shape[0]:
        raise ValueError("exclude_self needs query row i to match bank row i")
    k = min(int(k), bank.shape[0] - int(exclude_self))
    out = []
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk].to(bank.device)
        sim = q @ bank.T
        if exclude_self:
            rows = torch.arange(q.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(q.shape[0], n_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=bank.device)
