"""``poisonscan demo``: the whole pipeline on the bundled CIFAR-10 subset (see docs/demo.md).

poison (bundled clean subset + HTBA trigger) -> threat model (bundled, made by our own ``pretrain``; or trained
with ``--pretrain``) -> backdoor strength -> detect -> detection quality against ground truth -> clean -> linear
probe ACC/ASR before and after cleaning.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from poisonscan.config import PoisonConfig

#: the bundled demo data, trigger and threat model (inside the installed package)
ASSETS = Path(str(resources.files("poisonscan").joinpath("assets")))
DEMO_TRAIN = ASSETS / "demo" / "train-000000.tar.gz"
DEMO_VAL = ASSETS / "demo" / "val-000000.tar.gz"
DEMO_TRIGGER = ASSETS / "triggers" / "trigger_10.png"
DEMO_MODEL = ASSETS / "demo" / "threat_model.safetensors"
DEMO_TARGET = "0"  # airplane

#: the attack planted by the demo (the cifar10 preset's setting on the bundled subset)
DEMO_ATTACK: dict[str, Any] = {"rate": 0.5, "trigger_size": 8.0, "margin": 0.25, "val_margin": 0.10, "seed": 0}

#: the recipe of the bundled threat model (poisonscan pretrain flags); benchmarks/make_demo_assets.py uses it
DEMO_RECIPE: dict[str, Any] = {"method": "simclr", "arch": "resnet18", "image_size": 32, "epochs": 100,
                               "batch_size": 256, "temperature": 0.2, "seed": 0}


def poison_demo_data(dest: Path, train: Path | str = DEMO_TRAIN, val: Path | str = DEMO_VAL,
                     trigger: Path | str = DEMO_TRIGGER, target: str = DEMO_TARGET, overwrite: bool = False,
                     quiet: bool = True) -> dict[str, Any]:
    """Plant the demo's poisons; returns paths of the poisoned train set, patched val set and ground truth."""
    from poisonscan.attacks.poison import poison_dataset

    cfg = PoisonConfig(data=str(train), out=str(dest), targets=[f"{target}={trigger}"], val=str(val),
                       overwrite=overwrite, **DEMO_ATTACK)
    summary = poison_dataset(cfg, quiet=quiet)
    return {"summary": summary, "train": Path(dest) / "train", "val_patched": Path(dest) / "val_patched",
            "ground_truth": Path(dest) / "ground_truth.csv"}
