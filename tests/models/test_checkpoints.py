"""Saving and loading encoders: our safetensors files, foreign state dicts, prefixes, pickle refusal, mismatches."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from poisonscan.errors import CheckpointError
from poisonscan.models import (Encoder, convert_checkpoint, create_encoder, load_encoder, read_encoder_metadata,
                               save_encoder)


class TrainingArgs:
    """A custom object of the kind training scripts pickle next to their weights."""

    def __init__(self) -> None:
        self.lr = 0.1


def _trained_like(arch: str, size: int, seed: int = 0) -> Encoder:
    """An encoder with non-default BN statistics, so a round trip checks buffers too."""
    torch.manual_seed(seed)
    enc = create_encoder(arch, size)
    with torch.no_grad():
        for mod in enc.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return enc.eval()


def _features(enc: nn.Module, size: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return enc.eval()(x)


@pytest.fixture(scope="module")
def cifar18() -> Encoder:
    return _trained_like("cifar_resnet18", 32)


@pytest.fixture(scope="module")
def momentum_sd() -> dict[str, torch.Tensor]:
    """A second set of CIFAR ResNet-18 weights standing in for a momentum encoder."""
    return _trained_like("cifar_resnet18", 32, seed=5).backbone.state_dict()


@pytest.fixture(scope="module")
def vit32() -> Encoder:
    return _trained_like("vit_tiny_patch16_224", 32)


@pytest.mark.parametrize("name", ["cifar18", "vit32"])
def test_round_trip_fp32_exact(tmp_path: Path, name: str, request: pytest.FixtureRequest) -> None:
    enc: Encoder = request.getfixturevalue(name)
    path = save_encoder(enc, tmp_path / "enc.safetensors", method="mocov3", epochs=3, notes={"poison": 0.5})
    loaded, meta = load_encoder(path)
    assert not loaded.training and loaded.arch == enc.arch and loaded.image_size == 32
    assert torch.equal(_features(loaded, 32), _features(enc, 32))
    assert meta["format"] == "poisonscan-encoder" and meta["method"] == "mocov3"
    assert (meta["arch"], meta["image_size"], meta["feature_dim"]) == (enc.arch, 32, enc.feature_dim)
    assert meta["epochs"] == 3 and meta["notes"] == {"poison": 0.5}
    assert meta["missing_keys"] == [] and meta["unexpected_keys"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]  # no temp file left behind


def test_file_metadata_strings(tmp_path: Path, cifar18: Encoder) -> None:
    path = save_encoder(cifar18, tmp_path / "e.safetensors", method="simclr", seed=7)
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata()
        keys = set(fh.keys())
    assert raw["format"] == "poisonscan-encoder" and raw["arch"] == "cifar_resnet18"
    assert (raw["image_size"], raw["feature_dim"], raw["method"], raw["seed"]) == ("32", "512", "simclr", "7")
    assert "conv1.weight" in keys  # timm key names, no "backbone." prefix
    assert read_encoder_metadata(path)["seed"] == 7
    with pytest.raises(ValueError, match="arch"):
        save_encoder(cifar18, tmp_path / "x.safetensors", arch="resnet18")


def test_round_trip_fp16_is_half_size_and_loads_as_fp32(tmp_path: Path, cifar18: Encoder) -> None:
    full = save_encoder(cifar18, tmp_path / "full.safetensors")
    half = save_encoder(cifar18, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, meta = load_encoder(half)
    assert meta["dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = _trained_like("cifar_resnet18", 32)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in cifar18.state_dict().items()})
    assert torch.equal(_features(loaded, 32), _features(rounded, 32))
    torch.testing.assert_close(_features(loaded, 32), _features(cifar18, 32), rtol=2e-2, atol=2e-2)


def test_custom_stats_and_build_kwargs_round_trip(tmp_path: Path) -> None:
    enc = create_encoder("vit_tiny_patch16_224", 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), depth=2)
    loaded, _ = load_encoder(save_encoder(enc, tmp_path / "v.safetensors"))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5) and len(loaded.backbone.blocks) == 2
    assert torch.equal(_features(loaded, 32), _features(enc, 32))


def test_our_file_refuses_other_arch_and_resizes_vit(tmp_path: Path, vit32: Encoder) -> None:
    path = save_encoder(vit32, tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match="not resnet18"):
        load_encoder(path, arch="resnet18")
    bigger, meta = load_encoder(path, arch="vit_tiny_patch16_224", image_size=64)
    assert bigger.image_size == 64 and meta["image_size"] == 64 and meta["resized_keys"] == ["pos_embed"]
    assert _features(bigger, 64).shape == (2, 192)


@pytest.mark.parametrize(("online", "momentum", "extra"), [
    ("module.base_encoder.", "module.momentum_encoder.", {"module.predictor.0.weight": torch.zeros(4, 4)}),  # MoCo v3
    ("module.encoder_q.", "module.encoder_k.", {"module.queue": torch.zeros(512, 8)}),  # SSL-Backdoor MoCo v2
    ("backbone.", "momentum_backbone.", {"projector.0.weight": torch.zeros(4, 4)}),  # solo-learn
    ("model.backbone.", None, {"model.classifier.weight": torch.zeros(10, 512)}),  # Lightning wrapper
    ("module.encoder.", None, {}),  # BYOL/SimSiam-style DataParallel
])
def test_ssl_checkpoint_prefixes(tmp_path: Path, cifar18: Encoder, momentum_sd: dict[str, torch.Tensor],
                                 online: str, momentum: str | None, extra: dict[str, torch.Tensor]) -> None:
    sd = cifar18.backbone.state_dict()
    state = {online + k: v for k, v in sd.items()}
    state.update({online + "fc.0.weight": torch.zeros(8, 512), online + "head.weight": torch.zeros(8, 512)})
    if momentum:  # listed first so that order alone cannot pick the online encoder
        state = {**{momentum + k: v for k, v in momentum_sd.items()}, **state}
    state.update(extra)
    path = tmp_path / "ssl.pth"
    torch.save({"epoch": 10, "arch": "cifar_resnet18", "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    loaded, meta = load_encoder(path, arch="cifar_resnet18")
    assert meta["prefix"] == online.removeprefix("module.")
    assert meta["missing_keys"] == [] and meta["unexpected_keys"] == [] and meta["dropped_keys"] >= 2
    assert meta["checkpoint_fields"] == {"epoch": 10, "arch": "cifar_resnet18"}
    assert torch.equal(_features(loaded, 32), _features(cifar18, 32))


def test_arch_is_read_from_the_checkpoint(tmp_path: Path, cifar18: Encoder) -> None:
    path = tmp_path / "c.pth"
    torch.save({"arch": "cifar_resnet18", "model": cifar18.backbone.state_dict()}, path)
    loaded, meta = load_encoder(path)
    assert loaded.arch == "cifar_resnet18" and meta["image_size"] == 32
    torch.save(cifar18.backbone.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="--arch"):
        load_encoder(tmp_path / "plain.pth")


def test_timm_safetensors_state_dict_and_vit_size_inference(tmp_path: Path) -> None:
    enc = _trained_like("vit_tiny_patch16_224", 64)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path), metadata={"format": "pt"})
    loaded, meta = load_encoder(path, arch="vit_tiny_patch16_224")
    assert loaded.image_size == 64 and meta["format"] == "safetensors"
    assert torch.equal(_features(loaded, 64), _features(enc, 64))
    tiny = tmp_path / "tiny.safetensors"                                 # 168 bytes asking for 160,000,000 px
    save_file({"pos_embed": torch.zeros(1, 10**8, 0), "patch_embed.proj.weight": torch.zeros(0, 3, 16, 16000)},
              str(tiny))
    with pytest.raises(CheckpointError, match="implies 160000000 px images"):
        load_encoder(tiny, arch="vit_tiny_patch16_224")
    long = tmp_path / "long.safetensors"                                 # matching it would take hours
    save_file({"a." * 500_000 + "conv1.weight": torch.zeros(1)}, str(long))
    with pytest.raises(CheckpointError, match="names a weight with 1000012 characters"):
        load_encoder(long, arch="resnet18")


@pytest.mark.parametrize("payload", [argparse.Namespace(lr=0.1), TrainingArgs()])
def test_pickle_checkpoint_refused_then_trusted(tmp_path: Path, cifar18: Encoder, payload: object) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": cifar18.backbone.state_dict(), "args": payload}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as info:
        load_encoder(path, arch="cifar_resnet18")
    assert "pickle" in str(info.value) and "arbitrary code" in str(info.value)
    loaded, _ = load_encoder(path, arch="cifar_resnet18", trust_pickle=True)
    assert torch.equal(_features(loaded, 32), _features(cifar18, 32))


def test_wrong_architecture_is_refused(tmp_path: Path, cifar18: Encoder) -> None:
    path = tmp_path / "c.pth"
    torch.save(cifar18.backbone.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv1\.weight"):
        load_encoder(path, arch="resnet18")  # 3x3 CIFAR stem vs 7x7 ImageNet stem
    with pytest.raises(CheckpointError, match="no weights .* match"):
        load_encoder(path, arch="vit_tiny_patch16_224", image_size=32)
    bigger = tmp_path / "r34.pth"
    torch.save(create_encoder("resnet34", 32).backbone.state_dict(), bigger)
    with pytest.raises(CheckpointError, match=r"lacks, e\.g\. layer1\.2"):
        load_encoder(bigger, arch="resnet18")


def test_missing_keys_warn_a_few_and_refuse_many(tmp_path: Path, cifar18: Encoder,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    sd = cifar18.backbone.state_dict()
    few = {k: v for k, v in sd.items() if k != "layer4.1.bn2.bias"}
    torch.save(few, tmp_path / "few.pth")
    with caplog.at_level(logging.WARNING, logger="poisonscan.models.checkpoints"):
        loaded, meta = load_encoder(tmp_path / "few.pth", arch="cifar_resnet18")
    assert meta["missing_keys"] == ["layer4.1.bn2.bias"] and "layer4.1.bn2.bias" in caplog.text
    assert torch.isfinite(loaded.backbone.layer4[1].bn2.bias).all()
    with pytest.raises(CheckpointError, match="missing"):
        load_encoder(tmp_path / "few.pth", arch="cifar_resnet18", strict=True)
    many = {k: v for k, v in sd.items() if not k.startswith("layer4")}
    torch.save(many, tmp_path / "many.pth")
    with pytest.raises(CheckpointError, match=r"missing, e\.g\. layer4"):
        load_encoder(tmp_path / "many.pth", arch="cifar_resnet18")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "nope.pth", arch="resnet18")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip" * 4)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_encoder(bad, arch="resnet18")
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "optimizer": {}}, empty)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_encoder(empty, arch="resnet18")


def test_convert_checkpoint_to_safetensors(tmp_path: Path, cifar18: Encoder) -> None:
    src = tmp_path / "moco.pth"
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in cifar18.backbone.state_dict().items()}}, src)
    convert_checkpoint(src, tmp_path / "out.safetensors", arch="cifar_resnet18", dtype="fp16", method="mocov2")
    meta = read_encoder_metadata(tmp_path / "out.safetensors")
    assert meta["method"] == "mocov2" and meta["source_checkpoint"] == "moco.pth" and meta["dtype"] == "float16"
    loaded, _ = load_encoder(tmp_path / "out.safetensors")
    torch.testing.assert_close(_features(loaded, 32), _features(cifar18, 32), rtol=2e-2, atol=2e-2)
    assert json.loads(json.dumps(meta))  # JSON-safe
