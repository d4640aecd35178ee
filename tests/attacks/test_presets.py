"""Attack presets: shared data root, values, and how they merge with explicit settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from poisonscan.attacks.presets import DATA_ENV, PRESETS, apply_preset, preset_values, shared_data_root
from poisonscan.config import PoisonConfig
from poisonscan.settings import PAPER
from poisonscan.errors import UsageError


def test_shared_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert shared_data_root() == Path("../shared/data")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert shared_data_root() == tmp_path
    assert shared_data_root("/elsewhere") == Path("/elsewhere")


def test_preset_values(tmp_path: Path) -> None:
    im = preset_values("imagenette-96", tmp_path)
    assert im["data"] == str(tmp_path / "imagenette-96/train") and im["val"] == str(tmp_path / "imagenette-96/val")
    assert im["targets"] == [f"6={tmp_path / 'triggers/trigger_10.png'}"]
    assert (im["rate"], im["margin"], im["val_margin"], im["seed"], im["attack"]) == (0.5, 0.25, 0.10, 0, "patch")
    assert im["trigger_size"] == pytest.approx(50 / 224)
    cf = preset_values("cifar10", tmp_path)
    assert cf["data"] == str(tmp_path / "cifar10-wds/train-{000000..000009}.tar.gz")
    assert cf["val"] == str(tmp_path / "cifar10-wds/test-{000000..000001}.tar.gz")
    assert cf["targets"][0].startswith("0=") and cf["trigger_size"] == 8.0
    tin = preset_values("tinyimagenet100", tmp_path)
    assert tin["data"] == str(tmp_path / "tinyimagenet100-32-wds/train-{000000..000009}.tar.gz")
    assert tin["targets"] == [f"37={tmp_path / 'triggers/trigger_13.png'}"]
    assert set(PRESETS) == {"imagenette-96", "cifar10", "tinyimagenet100"}


def test_unknown_preset_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="did you mean 'cifar10'"):
        preset_values("cifar-10", tmp_path)
    with pytest.raises(UsageError, match="not found"):
        preset_values("cifar10", tmp_path / "missing")


def test_apply_preset_keeps_explicit_settings(tmp_path: Path) -> None:
    cfg = apply_preset(PoisonConfig(preset="imagenette-96", shared_data=str(tmp_path), seed=5, out="o"))
    assert cfg.data.endswith("imagenette-96/train") and cfg.rate == 0.5 and cfg.seed == 5 and cfg.out == "o"
    assert cfg.trigger_size == PAPER.trigger_size / PAPER.reference_size
    by_dataset = apply_preset(PoisonConfig(preset="cifar10", shared_data=str(tmp_path), dataset_rate=0.01))
    assert by_dataset.rate is None and by_dataset.dataset_rate == 0.01
    given = PoisonConfig(preset="cifar10", shared_data=str(tmp_path), data="mine")
    assert apply_preset(given) is given                                   # an expanded preset is not re-applied
