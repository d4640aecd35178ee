"""Pretraining loop: a tiny run writes checkpoints and logs; resume gives the same weights; CLI summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from poisonscan.cli import app
from poisonscan.config import PretrainConfig
from poisonscan.runs import RunDir
from poisonscan.runtime import setup_runtime
from poisonscan.ssl.trainer import load_checkpoint, run_pretrain


def _cfg(data: Path, out: Path, **kw: object) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), arch="test_resnet", image_size=16, proj_hidden=64, proj_dim=32,
                epochs=2, batch_size=4, num_workers=0, quiet=True, device="cpu", precision="fp32", seed=3)
    base.update(kw)
    return PretrainConfig(**base)  # type: ignore[arg-type]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["model"]


def test_tiny_run_writes_checkpoints_and_logs(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_pretrain(_cfg(image_folder, out, epochs=1))
    assert summary["epochs"] == 1 and summary["steps"] == 1  # 6 images, batch 4: one step per epoch
    assert summary["device"] == "cpu" and summary["precision"] == "float32"          # fp32: no autocast
    for name in ("last.pt", "encoder.safetensors", "log.csv", "log.json", "config.json", "environment.json",
                 "summary.json", "stages/pretrain.done"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 1 and ckpt["config"]["arch"] == "test_resnet"
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["loss"]) > 0 and float(rows[0]["images_per_s"]) > 0
    assert json.loads((out / "log.json").read_text())[0]["step"] == 1

    from poisonscan.models import load_encoder
    encoder, meta = load_encoder(out / "encoder.safetensors")
    assert meta["arch"] == "test_resnet" and meta["image_size"] == 16 and meta["method"] == "simclr"
    assert meta["epochs"] == 1 and meta["seed"] == 3
    trained = {k.removeprefix("encoder.backbone."): v for k, v in ckpt["model"].items()
               if k.startswith("encoder.backbone.")}
    for k, v in encoder.backbone.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_webdataset_source_mocov3_fp16_weights(wds_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_pretrain(_cfg(wds_shards, out, method="mocov3", epochs=1, save_fp16=True, optimizer="lars"))
    assert summary["images"] == 8 and summary["steps"] == 2 and summary["optimizer"] == "lars"
    from safetensors import safe_open
    with safe_open(str(out / "encoder.safetensors"), "pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys() if fh.get_tensor(k).is_floating_point()}
    assert dtypes == {torch.float16}


def test_resume_equals_uninterrupted(image_folder: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    run_pretrain(_cfg(image_folder, full, batch_size=2))
    first = run_pretrain(_cfg(image_folder, part, batch_size=2), stop_after_epoch=1)
    assert first["epochs"] == 1 and not (part / "stages/pretrain.done").exists()
    resumed = run_pretrain(_cfg(image_folder, part, batch_size=2, resume=str(part)))
    assert resumed["epochs"] == 2 and resumed["steps"] == 6
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = load_checkpoint(part)["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert [r["loss"] for r in history] == [r["loss"] for r in load_checkpoint(full)["history"]]


def test_resume_writes_only_to_a_cache_named_again(image_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The store cache a checkpoint names is not where a resumed run writes: only --store-cache given again is."""
    from poisonscan.ssl.trainer import resume_config

    run, cache = tmp_path / "run", tmp_path / "cache"
    run_pretrain(_cfg(image_folder, run, epochs=1, store_cache=str(cache)))
    assert (cache / "store.json").is_file()
    cfg = resume_config(run, {"epochs": 2})
    assert cfg.store_cache is None and cfg.epochs == 2
    assert "not reused on --resume" in capsys.readouterr().err
    assert resume_config(run, {"store_cache": str(cache)}).store_cache == str(cache)


def test_knn_monitor_logged(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_pretrain(_cfg(image_folder, out, epochs=1, knn_val=str(image_folder), knn_every=1))
    assert 0.0 <= summary["knn_acc"] <= 1.0
    assert json.loads((out / "log.json").read_text())[0]["knn_acc"] == summary["knn_acc"]


def test_keep_every_writes_loadable_snapshots(image_folder: Path, tmp_path: Path) -> None:
    from poisonscan.models import load_encoder
    from poisonscan.ssl.trainer import snapshot_name

    out = tmp_path / "run"
    run_pretrain(_cfg(image_folder, out, epochs=3, keep_every=2))
    assert sorted(p.name for p in out.glob("encoder-e*.safetensors")) == [snapshot_name(2)]
    assert snapshot_name(2) == "encoder-e002.safetensors"
    snap = load_encoder(out / snapshot_name(2))[0]
    last = load_encoder(out / "encoder.safetensors")[0]
    assert snap.state_dict().keys() == last.state_dict().keys()
    assert any(not torch.equal(snap.state_dict()[k], last.state_dict()[k]) for k in snap.state_dict())


def test_batch_larger_than_data_is_a_usage_error(image_folder: Path, tmp_path: Path) -> None:
    from poisonscan.errors import UsageError
    with pytest.raises(UsageError, match="larger than the data set"):
        run_pretrain(_cfg(image_folder, tmp_path / "run", batch_size=64), runtime=setup_runtime("cpu", "fp32"))


def test_cli_pretrain_json_and_resume(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["pretrain", "--data", str(image_folder), "--arch", "test_resnet", "--image-size", "16", "--epochs", "1",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--out", str(out), "--json", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["epochs"] == 1 and Path(summary["encoder"]).is_file()
    # resume with more epochs continues from the checkpoint's config
    res = runner.invoke(app, ["pretrain", "--resume", str(out), "--epochs", "2", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["epochs"] == 2
    assert RunDir(out).read_json("config.json")["epochs"] == 2


def test_cli_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                              "--device", "cpu", "--quiet"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "checkpoint" in res.output


def test_backdoor_monitor_logs_knn_asr_and_plot(image_folder: Path, tmp_path: Path) -> None:
    from PIL import Image

    trigger = tmp_path / "trigger.png"
    Image.new("RGB", (8, 8), (255, 0, 255)).save(trigger)
    out = tmp_path / "run"
    run_pretrain(_cfg(image_folder, out, epochs=1, knn_val=str(image_folder), knn_every=1,
                      backdoor_trigger=str(trigger), backdoor_target="cat", backdoor_trigger_size=4.0))
    row = json.loads((out / "log.json").read_text())[0]
    assert 0.0 <= row["knn_asr"] <= 1.0
    assert "knn_asr" in (out / "log.csv").read_text().splitlines()[0]
    assert (out / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backdoor_monitor_needs_val_trigger_and_target(image_folder: Path, tmp_path: Path) -> None:
    from poisonscan.errors import UsageError

    with pytest.raises(UsageError, match="backdoor monitor"):
        run_pretrain(_cfg(image_folder, tmp_path / "run", epochs=1, backdoor_target="cat"))


def test_cuda_rng_state_restores_this_processs_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved state is one tensor (this process's GPU) or, from older checkpoints, one per GPU of the saving
    machine: the entry of the current GPU is restored when it exists, nothing when it does not; CPU states round-trip."""
    from poisonscan.ssl.trainer import rng_state, set_rng_state

    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": restored.append(t))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ts: pytest.fail("every GPU's state restored"))
    state = rng_state()
    expected = torch.rand(3)
    gpus = [torch.full((16,), k, dtype=torch.uint8) for k in range(8)]
    set_rng_state({**state, "cuda": gpus})
    assert torch.equal(torch.rand(3), expected)
    assert len(restored) == 1 and torch.equal(restored[0], gpus[2])
    set_rng_state({**state, "cuda": gpus[:2]})                # a machine with fewer GPUs than this index
    assert len(restored) == 1
    set_rng_state({**state, "cuda": gpus[5]})
    assert len(restored) == 2 and torch.equal(restored[1], gpus[5])


def test_an_empty_scaler_state_is_not_loaded(image_folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saved without fp16 loss scaling (CPU, bf16) resumes with fp16 scaling on: the empty saved scaler state
    is not loaded (torch refuses to load one into an enabled scaler)."""
    from poisonscan.ssl.trainer import build_trainer, resume_config

    run = tmp_path / "run"
    run_pretrain(_cfg(image_folder, run, epochs=1))
    assert load_checkpoint(run)["scaler"] == {}
    monkeypatch.setattr(torch.amp.GradScaler, "is_enabled", lambda self: True)
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, sd: pytest.fail("an empty scaler state was loaded"))
    trainer = build_trainer(resume_config(run, {"epochs": 2}))
    assert trainer.epoch == 1
    trainer.run.release()
