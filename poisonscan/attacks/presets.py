"""Named attack settings on the shared benchmark data (documented in docs/presets.md)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from poisonscan.config import PoisonConfig

from poisonscan.settings import PAPER
from poisonscan.errors import UsageError

#: environment variable naming the shared data root (``--shared-data`` wins over it)
DATA_ENV = "POISONSCAN_DATA"
DEFAULT_SHARED_DATA = Path("..") / "shared" / "data"


@dataclass(frozen=True)
class Preset:
    """A reproducible attack: paths relative to the shared data root, plus ``PoisonConfig`` values."""

    name: str
    description: str
    data: str
    val: str
    targets: tuple[tuple[str, str], ...]          # (class, trigger path relative to the shared root)
    values: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset(
            name="imagenette-96",
            description="Imagenette 96 px: 50% of class 6 (garbage truck, n03417042) carry HTBA trigger_10 at "
                        "50/224 of the side (21 px), corner in [0.25 W, 0.75 W - size]; val patched at margin 0.10",
            data="imagenette-96/train",
            val="imagenette-96/val",
            targets=(("6", "triggers/trigger_10.png"),),
            values={"attack": "patch", "rate": 0.5, "trigger_size": PAPER.trigger_size / PAPER.reference_size,
                    "margin": PAPER.train_margin, "val_margin": PAPER.val_margin, "opacity": 1.0, "seed": 0},
        ),
        Preset(
            name="cifar10",
            description="CIFAR-10 shards: 50% of class 0 (airplane, CTRL's CIFAR-10 target) carry HTBA trigger_10 "
                        "at 8 px on 32 px images, corner in [8, 16]; test shards patched at margin 0.10",
            data="cifar10-wds/train-{000000..000009}.tar.gz",
            val="cifar10-wds/test-{000000..000001}.tar.gz",
            targets=(("0", "triggers/trigger_10.png"),),
            values={"attack": "patch", "rate": 0.5, "trigger_size": 8.0, "margin": PAPER.train_margin,
                    "val_margin": PAPER.val_margin, "opacity": 1.0, "seed": 0},
        ),
        Preset(
            name="tinyimagenet100",
            description="Tiny-ImageNet-100 shards at 32 px (100 classes, 50,000 images): 50% of class 37 (birdhouse, "
                        "n02843684) carry HTBA trigger_13 at 8 px, corner in [8, 16] (250 poisons, 0.5% of the "
                        "data); val shard patched at margin 0.10",
            data="tinyimagenet100-32-wds/train-{000000..000009}.tar.gz",
            val="tinyimagenet100-32-wds/val-000000.tar.gz",
            targets=(("37", "triggers/trigger_13.png"),),
            values={"attack": "patch", "rate": 0.5, "trigger_size": 8.0, "margin": PAPER.train_margin,
                    "val_margin": PAPER.val_margin, "opacity": 1.0, "seed": 0},
        ),
    )
}


def shared_data_root(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$POISONSCAN_DATA``, else ``../shared/data`` relative to the current directory."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_SHARED_DATA


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a ``UsageError`` with a suggestion."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown preset '{name}'{hint}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_values(name: str, shared_data: str | Path | None = None) -> dict[str, Any]:
    """``PoisonConfig`` field values of preset ``name`` with paths resolved against the shared data root."""
    preset = get_preset(name)
    root = shared_data_root(shared_data)
    if not root.is_dir():
        raise UsageError(f"shared data folder {root} not found (give --shared-data or set {DATA_ENV})")
    return {
        **preset.values,
        "data": str(root / preset.data),
        "val": str(root / preset.val),
        "targets": [f"{cls}={root / trig}" for cls, trig in preset.targets],
    }


def apply_preset(cfg: PoisonConfig) -> PoisonConfig:
    """Fill the fields of ``cfg`` still at their defaults from ``cfg.preset`` (library use; the CLI merges
    preset < config file < flags itself and then sets ``data``, so a preset is applied only once)."""
    if not cfg.preset or cfg.data:
        return cfg
    defaults = PoisonConfig()
    values = preset_values(cfg.preset, cfg.shared_data)
    if cfg.dataset_rate is not None:
        values.pop("rate", None)
    changes = {f.name: values[f.name] for f in fields(PoisonConfig)
               if f.name in values and getattr(cfg, f.name) == getattr(defaults, f.name)}
    return replace(cfg, **changes)
