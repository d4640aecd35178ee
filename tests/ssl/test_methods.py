"""SimCLR / MoCo v3 heads, losses, momentum encoder and the method registry."""

from __future__ import annotations

import math

import pytest
import torch

from poisonscan.errors import UsageError
from poisonscan.models import create_encoder
from poisonscan.ssl.methods import MoCoV3, SimCLR, create_method, list_methods, momentum_at


def _views(n: int = 4, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


def test_simclr_loss_and_gradients() -> None:
    torch.manual_seed(0)
    m = create_method("simclr", create_encoder("test_resnet", 16), proj_hidden=32, proj_dim=16)
    assert isinstance(m, SimCLR) and m.projector[-1].num_features == 16
    v = _views()
    loss = m(v)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in m.encoder.parameters() if p.requires_grad)
    # one encoder pass over both views: swapping the views gives the same loss
    torch.testing.assert_close(m(v[::-1]), m(v))


def test_mocov3_momentum_encoder_and_symmetry() -> None:
    torch.manual_seed(0)
    m = create_method("mocov3", create_encoder("test_resnet", 16), proj_dim=16, hidden=32, pred_hidden=32,
                      momentum=0.9)
    assert isinstance(m, MoCoV3)
    assert not any(p.requires_grad for p in m.momentum_encoder.parameters())
    v = _views()
    loss = m(v)
    torch.testing.assert_close(m(v[::-1]), loss)
    loss.backward()
    assert all(p.grad is None for p in m.momentum_encoder.parameters())
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.momentum_encoder.parameters()]
    online = [p.clone() for p in m.encoder.parameters()]
    m.after_step(0, 10)
    for b, o, a in zip(before, online, m.momentum_encoder.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)


def test_momentum_schedule() -> None:
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)


def test_registry() -> None:
    assert {"simclr", "mocov3"} <= set(list_methods())
    assert isinstance(create_method("moco", create_encoder("test_resnet", 16), hidden=8, pred_hidden=8), MoCoV3)
    with pytest.raises(UsageError, match="mocov3"):
        create_method("mocov2", create_encoder("test_resnet", 16))
