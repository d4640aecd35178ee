"""Self-supervised methods: an encoder plus heads whose ``forward(views)`` returns the training loss.

Every method exposes ``encoder`` (the backbone that ``save_encoder`` writes), ``forward(views) -> loss`` (one call per
step, so the whole method can be wrapped in DistributedDataParallel) and ``after_step(step, total_steps)`` for state
updated outside the optimiser (MoCo v3's momentum encoder).
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from poisonscan.errors import UsageError
from poisonscan.ssl.losses import InfoNCE, NTXent


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = True,
        last_bn_affine: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a Linear (optionally followed by BatchNorm), as in SimCLR / MoCo v3 heads."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)


class SSLMethod(nn.Module):
    """Base class: holds the encoder; subclasses define the heads and the loss."""

    name = "base"

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.encoder, "feature_dim"))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (``step`` counts completed steps)."""

    def hparams(self) -> dict[str, Any]:
        return {"method": self.name}


class SimCLR(SSLMethod):
    """SimCLR: encoder -> 2-layer BN projector -> NT-Xent over both views (one encoder pass on the 2N batch)."""

    name = "simclr"

    def __init__(self, encoder: nn.Module, proj_hidden: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.2) -> None:
        super().__init__(encoder)
        self.projector = mlp(self.feature_dim, proj_hidden, proj_dim, layers=2, last_bn=True)
        self.loss = NTXent(temperature)
        self._hp = {"proj_hidden": proj_hidden, "proj_dim": proj_dim, "temperature": temperature}

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        if len(views) != 2:
            raise ValueError("SimCLR needs two views")
        n = views[0].shape[0]
        z = self.projector(self.encoder(torch.cat(views, dim=0)))
        return self.loss(z[:n], z[n:])

    def hparams(self) -> dict[str, Any]:
        return {"method": self.name, **self._hp}


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """MoCo v3 / BYOL schedule: ``base`` rising to 1 along a half cosine over training."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1) / 2


class MoCoV3(SSLMethod):
    """MoCo v3: encoder + projector + predictor, momentum encoder + projector, symmetric InfoNCE.

    ResNet recipe: 3-layer projector and 2-layer predictor with BN, last projector BN without affine. ViT (``vit``
    in the arch name) uses the same heads, as in the paper's code.
    """

    name = "mocov3"

    def __init__(self, encoder: nn.Module, proj_dim: int = 256, hidden: int = 4096, pred_hidden: int = 4096,
                 temperature: float = 0.2, momentum: float = 0.99) -> None:
        super().__init__(encoder)
        self.projector = mlp(self.feature_dim, hidden, proj_dim, layers=3, last_bn=True, last_bn_affine=False)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim, layers=2, last_bn=True, last_bn_affine=False)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)
        self.loss = InfoNCE(temperature)
        self.base_momentum = float(momentum)
        self.momentum = float(momentum)
        self._hp = {"proj_dim": proj_dim, "hidden": hidden, "pred_hidden": pred_hidden,
                    "temperature": temperature, "momentum": momentum}

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        if len(views) != 2:
            raise ValueError("MoCo v3 needs two views")
        n = views[0].shape[0]
        both = torch.cat(views, dim=0)
        q = self.predictor(self.projector(self.encoder(both)))
        with torch.no_grad():
            k = self.momentum_projector(self.momentum_encoder(both))
        return self.loss(q[:n], k[n:]) + self.loss(q[n:], k[:n])

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.momentum = momentum_at(step, total_steps, self.base_momentum)
        m = self.momentum
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            src = [p.detach() for p in online.parameters()]
            dst = list(target.parameters())
            torch._foreach_mul_(dst, m)
            torch._foreach_add_(dst, src, alpha=1 - m)

    def hparams(self) -> dict[str, Any]:
        return {"method": self.name, **self._hp}


_METHODS: dict[str, Callable[..., SSLMethod]] = {"simclr": SimCLR, "mocov3": MoCoV3}
_ALIASES = {"moco": "mocov3", "moco_v3": "mocov3", "moco-v3": "mocov3"}


def register_method(name: str) -> Callable[[Callable[..., SSLMethod]], Callable[..., SSLMethod]]:
    """Decorator adding a method class/factory to the registry under ``name``."""

    def deco(fn: Callable[..., SSLMethod]) -> Callable[..., SSLMethod]:
        _METHODS[name] = fn
        return fn

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, encoder: nn.Module, **kwargs: Any) -> SSLMethod:
    """Build method ``name`` around ``encoder``; keyword arguments go to the method (``None`` values dropped)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _METHODS:
        close = difflib.get_close_matches(key, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown SSL method '{name}'{hint}; choose one of {', '.join(list_methods())}")
    return _METHODS[key](encoder, **{k: v for k, v in kwargs.items() if v is not None})
