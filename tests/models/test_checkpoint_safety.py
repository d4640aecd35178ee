"""A checkpoint's content never makes poisonscan load weights, reach the network or read another file.

Our safetensors files say which encoder to build (``arch``, ``image_size``, ``mean``/``std``, ``build_kwargs``);
these tests write files whose metadata asks timm for pretrained weights, a local checkpoint, a hub model, unknown or
mistyped arguments, and check that loading refuses them with a one-line ``CheckpointError`` (exit code 2 from the
CLI) while the network stays untouched.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from poisonscan.cli import app
from poisonscan.demo import DEMO_MODEL
from poisonscan.errors import CheckpointError, UsageError
from poisonscan.models import create_encoder, is_known_arch, load_encoder, save_encoder
from poisonscan.models.encoders import _timm_backbone

URL = "http://127.0.0.1:9/weights.pth"     # with pretrained=True timm fetches from the hub or from this URL
HUB_NAMES = ["hf-hub:timm/resnet18.a1_in1k", "hf_hub:timm/resnet18", "local-dir:/tmp/model", "timm/resnet18",
             "resnet18.a1:hf-hub", "../resnet18", "C:\\models\\resnet18", "resnet18 ", ""]
NOT_A_NAME = "hub repo or a path|not a valid model name"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """Record (and refuse) every outgoing connection; point the torch/HF caches at ``tmp_path/cache``."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"network access from a test: {name}")
        return fn

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for var in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "cache"))
    yield calls
    assert not calls, f"network access: {calls}"


def _rewrite(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy ``src`` (one of our files) to ``dst`` with metadata entries replaced (values JSON-encoded)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good ResNet-18 file, a good 1-block ViT file and a plain torch state dict the first one fits."""
    root = tmp_path_factory.mktemp("safety")
    resnet = create_encoder("resnet18", 32)
    torch.save(resnet.backbone.state_dict(), root / "weights.pth")
    return {"resnet": save_encoder(resnet, root / "resnet.safetensors"),
            "vit": save_encoder(create_encoder("vit_tiny_patch16_224", 32, depth=1), root / "vit.safetensors"),
            "weights": root / "weights.pth"}


def _refused(path: Path, match: str) -> str:
    """Load ``path``, expecting a one-line CheckpointError whose text (the path left out) matches ``match``."""
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value).replace(str(path), "FILE")
    assert re.search(match, message), message
    assert "\n" not in message and len(message) < 400
    return message


@pytest.mark.parametrize("case", ["pretrained_url", "checkpoint_path", "overlay_file", "cfg_file", "file",
                                  "cache_dir", "unknown"])
def test_build_kwargs_that_load_weights_or_are_unknown_are_refused(files, tmp_path, case) -> None:
    weights = str(files["weights"])
    kwargs = {"pretrained_url": {"pretrained": True, "pretrained_cfg_overlay": {"url": URL}},
              "checkpoint_path": {"checkpoint_path": weights},
              "overlay_file": {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}},
              "cfg_file": {"pretrained": True, "pretrained_cfg": {"file": weights, "num_classes": 0}},
              "file": {"file": weights},
              "cache_dir": {"cache_dir": str(tmp_path / "hub")},
              "unknown": {"global_pool": "avg"}}[case]
    bad = _rewrite(files["resnet"], tmp_path / "bad.safetensors", build_kwargs=kwargs)
    message = _refused(bad, "not allowed")
    assert all(name in message for name in kwargs)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "hub").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": True}, "depth"),                     # a bool is not an int here
    ({"depth": "1"}, "depth"),
    ({"depth": 1.0}, "depth"),
    ({"depth": 65}, "depth"),
    ({"depth": 1, "drop_path_rate": "0.1"}, "drop_path_rate"),
    ({"depth": 1, "drop_path_rate": float("nan")}, "drop_path_rate"),
    ({"depth": 1, "num_heads": "/etc/passwd"}, "num_heads"),
    ([1], "build_kwargs"),
    ("depth=1", "build_kwargs"),
])
def test_build_kwargs_of_the_wrong_type_or_range_are_refused(files, tmp_path, kwargs, match) -> None:
    bad = _rewrite(files["vit"], tmp_path / "bad.safetensors", build_kwargs=json.dumps(kwargs))
    _refused(bad, match)


@pytest.mark.parametrize("key, value", [
    ("mean", "abc"), ("mean", [0.5, 0.5]), ("std", [0.0, 0.0, 0.0]), ("std", [float("inf")] * 3),
    ("mean", {"url": URL}), ("image_size", 1000000), ("image_size", -32),
])
def test_bad_normalisation_and_size_metadata_are_refused(files, tmp_path, key, value) -> None:
    bad = _rewrite(files["resnet"], tmp_path / "bad.safetensors", **{key: json.dumps(value)})
    _refused(bad, key)


@pytest.mark.parametrize("arch", HUB_NAMES)
def test_hub_and_path_arch_names_are_refused(files, tmp_path, arch, monkeypatch) -> None:
    built: list[str] = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: built.append(name) or real(name, *a, **k))
    bad = _rewrite(files["resnet"], tmp_path / "bad.safetensors", arch=arch)
    _refused(bad, NOT_A_NAME)
    assert not is_known_arch(arch)
    with pytest.raises(UsageError, match=NOT_A_NAME):
        create_encoder(arch, 32)
    # a foreign checkpoint naming its own architecture: the name is not taken up
    pth = tmp_path / "moco.pth"
    torch.save({"arch": arch, "state_dict": torch.load(files["weights"], weights_only=True)}, pth)
    with pytest.raises(CheckpointError, match="--arch"):
        load_encoder(pth)
    assert built == []


@pytest.mark.parametrize("arch", ["hf-hub:timm/resnet18", "timm/resnet18", "local-dir:/tmp/x"])
def test_hub_arch_names_get_a_specific_message(arch) -> None:
    with pytest.raises(UsageError, match="hub repo or a path"):
        create_encoder(arch, 32)


def test_timm_is_always_called_without_weights(monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    real = timm.create_model

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(dict(kwargs, _args=args))
        if args or kwargs.get("pretrained") is not False or kwargs.get("checkpoint_path"):
            pytest.fail(f"timm.create_model({name!r}, {args}, {kwargs})")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    for arch in ("resnet18", "cifar_resnet18", "mocov3_vit_small", "vit_tiny_patch16_224", "vit_tiny_p4"):
        create_encoder(arch, 32, depth=1) if "vit" in arch else create_encoder(arch, 32)
    _timm_backbone("resnet18", 32, pretrained=True, num_classes=10)   # the forced values come last
    assert calls and all(c["pretrained"] is False and c["num_classes"] == 0 for c in calls)
    for kw in ({"pretrained": True}, {"checkpoint_path": "x.pth"}, {"pretrained_cfg_overlay": {"url": URL}},
               {"cache_dir": "/tmp"}, {"pretrained_cfg": "a1_in1k"}):
        with pytest.raises(UsageError, match="untrained"):
            create_encoder("resnet18", 32, **kw)


def test_save_refuses_build_kwargs_a_load_would_refuse(tmp_path) -> None:
    with pytest.raises(ValueError, match="global_pool"):
        save_encoder(create_encoder("resnet18", 32, global_pool="avg"), tmp_path / "x.safetensors")


def test_legitimate_checkpoints_still_load(files) -> None:
    enc, meta = load_encoder(DEMO_MODEL)
    assert enc.arch == "resnet18" and enc.feature_dim == 512 and enc.build_kwargs == {}
    vit, _ = load_encoder(files["vit"])
    assert vit.build_kwargs == {"depth": 1} and len(vit.backbone.blocks) == 1
    ok = _rewrite(files["vit"], files["vit"].with_name("vit_dp.safetensors"),
                  build_kwargs={"depth": 1, "drop_path_rate": 0.1, "drop_rate": 0, "num_heads": 3})
    assert load_encoder(ok)[0].build_kwargs["drop_path_rate"] == 0.1


def test_cli_detect_refuses_a_checkpoint_that_asks_for_a_download(files, tmp_path, image_folder,
                                                                  no_network) -> None:
    bad = _rewrite(files["resnet"], tmp_path / "bad.safetensors",
                   build_kwargs={"pretrained": True, "pretrained_cfg_overlay": {"url": URL}})
    res = CliRunner().invoke(app, ["detect", str(image_folder), "--model", str(bad), "--out", str(tmp_path / "x"),
                                   "--device", "cpu"])
    assert no_network == []
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pretrained" in lines[0], res.stderr
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    assert not (tmp_path / "x" / "stages").exists()
    assert not (tmp_path / "cache").exists()
