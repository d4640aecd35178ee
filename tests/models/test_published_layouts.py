"""Bring-your-own checkpoints: state dicts laid out key for key like the published MoCo v3 (ViT-S/16, ResNet-50),
solo-learn (Lightning) and torchvision ResNet-50 files, built here with random weights, load into the encoder the
checkpoint's online network describes and give its features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from poisonscan.models import create_encoder, load_encoder


def _features(enc: nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return enc.eval()(x)


def _projector(prefix: str, dim: int, hidden: int = 16, out: int = 8) -> dict[str, torch.Tensor]:
    """MoCo v3's 3-layer projector (Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN without affine) under ``prefix``."""
    keys = {f"{prefix}0.weight": torch.randn(hidden, dim), f"{prefix}3.weight": torch.randn(hidden, hidden),
            f"{prefix}6.weight": torch.randn(out, hidden)}
    for i, width in ((1, hidden), (4, hidden), (7, out)):
        keys.update({f"{prefix}{i}.running_mean": torch.zeros(width), f"{prefix}{i}.running_var": torch.ones(width),
                     f"{prefix}{i}.num_batches_tracked": torch.tensor(5)})
        if i != 7:
            keys.update({f"{prefix}{i}.weight": torch.ones(width), f"{prefix}{i}.bias": torch.zeros(width)})
    return keys


def _shifted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights of the same shapes: the momentum encoder, which must not be the one loaded."""
    return {k: (v + 0.5 if v.is_floating_point() else v.clone()) for k, v in state.items()}


def test_a_mocov3_vit_small_checkpoint_loads_its_base_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    online = create_encoder("mocov3_vit_small", 224).eval()       # 12 heads, as MoCo v3's ViT-S
    sd = online.backbone.state_dict()
    state = {"module.base_encoder." + k: v for k, v in sd.items()}
    state.update(_projector("module.base_encoder.head.", 384))    # MoCo v3 puts the projector in the ViT's head
    state.update({"module.momentum_encoder." + k: v for k, v in _shifted(sd).items()})
    state.update(_projector("module.momentum_encoder.head.", 384))
    state.update(_projector("module.predictor.", 8))
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"lr": 1.5e-4},
                "scaler": {"scale": 65536.0}}, path)
    loaded, meta = load_encoder(path)                              # arch and size from the file itself
    assert (loaded.arch, loaded.image_size, loaded.kind, loaded.patch_size) == ("mocov3_vit_small", 224, "vit", 16)
    assert meta["prefix"] == "base_encoder." and meta["missing_keys"] == [] and meta["unexpected_keys"] == []
    assert meta["dropped_keys"] == len(_projector("", 384))        # the projector head; momentum and predictor ignored
    assert torch.equal(_features(loaded, 224), _features(online, 224))
    assert loaded.drops_tokens and loaded.token_grid == 14


def _torchvision_state(seed: int, arch: str = "resnet50") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A torchvision ResNet with non-default BN statistics, and its state dict without the classifier."""
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    with torch.no_grad():
        for mod in tv.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return tv, {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}


def test_a_mocov3_resnet50_checkpoint_loads_its_base_encoder(tmp_path: Path) -> None:
    tv, sd = _torchvision_state(0)
    state = {"module.base_encoder." + k: v for k, v in sd.items()}
    state.update(_projector("module.base_encoder.fc.", 2048))      # MoCo v3's ResNet projector replaces fc
    state.update({"module.momentum_encoder." + k: v for k, v in _shifted(sd).items()})
    state.update(_projector("module.momentum_encoder.fc.", 2048))
    state.update(_projector("module.predictor.", 8))
    path = tmp_path / "r-50-1000ep.pth.tar"
    torch.save({"epoch": 1000, "arch": "resnet50", "state_dict": state, "optimizer": {"lr": 0.6}}, path)
    loaded, meta = load_encoder(path, image_size=64)                # the arch from the file
    assert (loaded.arch, loaded.feature_dim) == ("resnet50", 2048)
    assert meta["prefix"] == "base_encoder." and meta["missing_keys"] == [] and meta["unexpected_keys"] == []
    tv.fc = nn.Identity()
    torch.testing.assert_close(_features(loaded, 64), _features(tv, 64), rtol=1e-4, atol=1e-4)


def test_a_solo_learn_lightning_checkpoint_loads_its_backbone(tmp_path: Path) -> None:
    tv, sd = _torchvision_state(1)                                    # solo-learn: torchvision resnet50, fc = Identity
    state = {"backbone." + k: v for k, v in sd.items()}
    state.update(_projector("projector.", 2048))
    state.update({"momentum_backbone." + k: v for k, v in _shifted(sd).items()})
    state.update(_projector("momentum_projector.", 2048))
    state.update({"classifier.weight": torch.randn(100, 2048), "classifier.bias": torch.zeros(100)})
    path = tmp_path / "byol-imagenet100.ckpt"
    torch.save({"epoch": 399, "global_step": 99_600, "pytorch-lightning_version": "2.1.0", "state_dict": state,
                "hyper_parameters": {"backbone": {"name": "resnet50"}, "max_epochs": 400},
                "optimizer_states": [{"state": {}}], "lr_schedulers": [{"last_epoch": 399}]}, path)
    loaded, meta = load_encoder(path, arch="resnet50", image_size=64)
    assert meta["prefix"] == "backbone." and meta["missing_keys"] == [] and meta["unexpected_keys"] == []
    tv.fc = nn.Identity()
    torch.testing.assert_close(_features(loaded, 64), _features(tv, 64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_torchvision_resnet_state_dict_loads_without_its_classifier(tmp_path: Path, arch: str) -> None:
    tv, _ = _torchvision_state(2, arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    loaded, meta = load_encoder(path, arch=arch, image_size=64)
    assert meta["prefix"] == "" and meta["missing_keys"] == [] and meta["dropped_keys"] == 2   # fc.weight, fc.bias
    tv.fc = nn.Identity()
    torch.testing.assert_close(_features(loaded, 64), _features(tv, 64), rtol=1e-4, atol=1e-4)
