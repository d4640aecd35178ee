"""Every command's settings as a typed dataclass; ``detect``'s stage sections live in their stages' modules.

Resolution (:func:`poisonscan.settings.resolve_config`): dataclass defaults < a preset file (``detect --preset``,
poisonscan/presets/) < a config file (TOML, YAML or JSON) < command-line flags (``--set section.key=value`` too).
Flags left at ``None`` do not override. The resolved config is written into every run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from poisonscan.detect.classifier import ClassifierSettings
from poisonscan.detect.decision import DecisionSettings
from poisonscan.detect.evidence import EvidenceSettings
from poisonscan.detect.search import SearchSettings
from poisonscan.detect.features import FEATURE_DTYPES
from poisonscan.errors import ConfigError
from poisonscan.runs import INVOCATION_SETTINGS
from poisonscan.settings import (PAPER, above, at_least, between, check_config, flag_only, one_of, read_table,
                                 resolve_config, stage)


@dataclass
class CommonConfig:
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    quiet: bool = False


@dataclass
class PretrainConfig(CommonConfig):
    data: str = ""
    out: str | None = None
    method: str = "simclr"
    arch: str = "resnet18"
    image_size: int = field(default=64, metadata=at_least(8))
    epochs: int = field(default=100, metadata=at_least(1))
    batch_size: int = field(default=256, metadata=at_least(2))
    lr: float | None = field(default=None, metadata=above(0.0))
    weight_decay: float | None = field(default=None, metadata=at_least(0.0))
    optimizer: str = "auto"
    temperature: float = field(default=0.2, metadata=above(0.0))
    warmup_epochs: float = field(default=1.0, metadata=at_least(0.0))
    grad_clip: float | None = field(default=None, metadata=above(0.0))
    num_workers: int = field(default=2, metadata=at_least(0))
    resume: str | None = field(default=None, metadata=flag_only("--resume"))
    save_fp16: bool = False
    # also keep encoder-eNNN.safetensors every N epochs (0: only the last)
    keep_every: int = field(default=0, metadata=at_least(0))
    knn_val: str | None = None
    knn_every: int = field(default=0, metadata=at_least(0))
    backdoor_trigger: str | None = None     # with knn_val: k-NN ASR of this trigger every knn_every epochs
    backdoor_target: str | None = None      # the attack's target class (name or index)
    backdoor_trigger_size: float = field(default=PAPER.trigger_size / PAPER.reference_size, metadata=above(0.0))
    store_cache: str | None = None      # folder caching the decoded uint8 image store (reused across runs)
    # projector (and MoCo v3 predictor) hidden width [simclr 2048, mocov3 4096]
    proj_hidden: int | None = field(default=None, metadata=at_least(1))
    proj_dim: int | None = field(default=None, metadata=at_least(1))  # projection output width [simclr 128, mocov3 256]
    # allow writing into a non-empty --out folder
    overwrite: bool = field(default=False, metadata=flag_only("--overwrite"))


@dataclass
class PoisonConfig:
    data: str = ""
    out: str = ""
    targets: list[str] = field(default_factory=list)   # CLASS=TRIGGER.png
    attack: str = "patch"
    rate: float | None = None
    dataset_rate: float | None = None
    trigger_size: float = field(default=PAPER.trigger_size / PAPER.reference_size, metadata=above(0.0))
    margin: float = field(default=PAPER.train_margin, metadata=between(0.0, 0.5, hi_open=True))
    val_margin: float = field(default=PAPER.val_margin, metadata=between(0.0, 0.5, hi_open=True))
    opacity: float = field(default=1.0, metadata=between(0.0, 1.0, lo_open=True))
    # each pasted copy changed on its own (patch): side x (1 +- s), turned +- degrees, channel gains 1 +- c
    scale_jitter: float = field(default=0.0, metadata=between(0.0, 0.9))
    rotation: float = field(default=0.0, metadata=between(0.0, 180.0))
    colour_jitter: float = field(default=0.0, metadata=between(0.0, 1.0))
    blend_alpha: float = field(default=0.2, metadata=between(0.0, 1.0, lo_open=True))
    ctrl_magnitude: float = 50.0        # CTRL reference: 50 on the training set
    ctrl_val_magnitude: float = 100.0   # ... and 100 on the test set
    # DCT block side; 0 = scaled with the image (32 px on 224 px)
    ctrl_block: int = field(default=32, metadata=at_least(0))
    val: str | None = None
    seed: int = 0
    overwrite: bool = field(default=False, metadata=flag_only("--overwrite"))
    link: bool = False
    preset: str | None = None
    shared_data: str | None = None      # presets' data root (default $POISONSCAN_DATA, else ../shared/data)


def _section(cls: type, stage_name: str) -> Any:
    return field(default_factory=cls, metadata=stage(stage_name))


@dataclass
class DetectConfig(CommonConfig):
    """``detect``: what a user sets at the top, each stage's research settings in its own section (owned by the
    stage's module). ``stage`` metadata names the first pipeline stage a setting shapes: a resume reruns from the
    earliest stage whose settings changed."""

    data: str = field(default="", metadata=stage("store"))
    model: str = field(default="", metadata=stage("store"))
    arch: str | None = field(default=None, metadata=stage("store"))
    image_size: int | None = field(default=None, metadata=stage("store", **at_least(8)))
    # features.npy and its host copy: float32 or float16 (half the memory)
    feature_dtype: str = field(default="float32", metadata=stage("features", **one_of(FEATURE_DTYPES)))
    clusters: int = field(default=PAPER.n_clusters, metadata=stage("clusters", **at_least(1)))   # l, capped at N / 50
    seed: int = field(default=0, metadata=stage("clusters"))
    search: SearchSettings = _section(SearchSettings, "search")
    evidence: EvidenceSettings = _section(EvidenceSettings, "evidence")
    classifier: ClassifierSettings = _section(ClassifierSettings, "classifier")
    decision: DecisionSettings = _section(DecisionSettings, "match")   # the gate decides whether to match and train
    fail_on: float | None = field(default=None, metadata=stage("outputs", **at_least(0.0)))
    # exit 1 above this many unscanned samples (0 when only --fail-on)
    fail_on_unreadable: int | None = field(default=None, metadata=stage("outputs", **at_least(0)))
    preset: str = "default"             # the preset file the settings started from (poisonscan/presets/)
    out: str | None = None
    resume: str | None = field(default=None, metadata=flag_only("--resume"))
    batch_size: int = field(default=256, metadata=at_least(1))
    trust_checkpoint: bool = field(default=False, metadata=flag_only("--trust-checkpoint"))
    overwrite: bool = field(default=False, metadata=flag_only("--overwrite"))


@dataclass
class CleanConfig:
    run: str | None = None
    source: str | None = None
    removed: str | None = None
    out: str = ""
    reshard: str | None = None
    strict: bool = False
    # keep samples the run could not scan (left out by default)
    keep_unreadable: bool = field(default=False, metadata=flag_only("--keep-unreadable"))
    shard_size: int = field(default=5000, metadata=at_least(1))
    compress: bool = False
    seed: int = 0                       # taken like every command's: cleaning draws nothing at random ...
    device: str = "auto"                # ... and runs no model
    quiet: bool = False                 # no summary lines (warnings and errors still go to stderr)


@dataclass
class EvalDetectionConfig:
    run: str = ""
    truth: str = ""
    csv: str | None = None
    plots: str | None = None
    # retrieved-trigger cut-offs
    topk: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100], metadata=at_least(1))
    # TPR at these FPRs
    fpr: list[float] = field(default_factory=lambda: [0.001, 0.01],
                             metadata=between(0.0, 1.0, lo_open=True, hi_open=True))
    seed: int = 0                       # taken like every command's: the metrics draw nothing at random ...
    device: str = "auto"                # ... and run no model
    quiet: bool = False                 # no tables (--json still prints the summary)


@dataclass
class EvalProbeConfig(CommonConfig):
    model: str = ""
    arch: str | None = None
    image_size: int | None = field(default=None, metadata=at_least(8))
    trust_checkpoint: bool = field(default=False, metadata=flag_only("--trust-checkpoint"))
    train: str = ""
    val: str = ""
    val_patched: str | None = None
    triggers: list[str] = field(default_factory=list)     # one for every target, or one per target
    targets: list[str] = field(default_factory=list)
    trigger_size: float = field(default=PAPER.trigger_size / PAPER.reference_size, metadata=above(0.0))
    margin: float = field(default=PAPER.val_margin, metadata=between(0.0, 0.5, hi_open=True))
    fraction: float = field(default=0.01, metadata=between(0.0, 1.0, lo_open=True))
    epochs: int = field(default=100, metadata=at_least(1))
    optimizer: str = "sgd"
    lr: float | None = field(default=None, metadata=above(0.0))  # default 0.1 x probe_batch / 256 (SGD), 1e-3 (Adam)
    probe_batch: int = field(default=256, metadata=at_least(1))
    batch_size: int = field(default=256, metadata=at_least(1))  # feature extraction
    out: str | None = None


@dataclass
class EvalBackdoorConfig(CommonConfig):
    model: str = ""
    arch: str | None = None
    image_size: int | None = field(default=None, metadata=at_least(8))
    trust_checkpoint: bool = field(default=False, metadata=flag_only("--trust-checkpoint"))
    data: str = ""
    trigger: str = ""
    target: str = ""
    train: str | None = None
    truth: str | None = None
    k: int = field(default=20, metadata=at_least(1))
    temperature: float = field(default=0.07, metadata=above(0.0))
    clusters: int = field(default=PAPER.n_clusters, metadata=at_least(1))  # capped at N // 50 like detect
    trigger_size: float = field(default=PAPER.trigger_size / PAPER.reference_size, metadata=above(0.0))
    margin: float = field(default=PAPER.val_margin, metadata=between(0.0, 0.5, hi_open=True))
    attack: str = "patch"                                  # patch, blend or ctrl: how the trigger is applied
    blend_alpha: float = field(default=0.2, metadata=between(0.0, 1.0, lo_open=True))  # blend: trigger weight
    ctrl_magnitude: float = field(default=100.0, metadata=above(0.0))  # ctrl: the reference's test-set magnitude
    ctrl_block: int = field(default=0, metadata=at_least(0))  # ctrl: DCT block side; 0 = scaled with the image
    fraction: float = field(default=0.01, metadata=between(0.0, 1.0, lo_open=True))
    epochs: int = field(default=100, metadata=at_least(1))
    batch_size: int = field(default=256, metadata=at_least(1))
    out: str | None = None


@dataclass
class DemoConfig(CommonConfig):
    data: str | None = None          # your own labelled training set instead of the bundled one (needs --pretrain)
    val: str | None = None           # its labelled validation set
    trigger: str | None = None
    target: str | None = None
    out: str | None = None
    pretrain: bool = False           # train the threat model instead of using the bundled one
    epochs: int | None = field(default=None, metadata=at_least(1))  # pretraining epochs with --pretrain
    # retrain on the cleaned manifest and probe again (0: skip)
    retrain_epochs: int = field(default=0, metadata=at_least(0))
    # reduced budget: an evenly spaced subset of this many training images
    limit: int | None = field(default=None, metadata=at_least(100))
    # reduced budget: masks per image (default: the paper's 256)
    masks: int | None = field(default=None, metadata=at_least(1))
    # reduced budget: poison-classifier iterations
    classifier_iters: int | None = field(default=None, metadata=at_least(1))


def presets() -> list[str]:
    """The names of the detect presets that ship with poisonscan (``poisonscan/presets/NAME.toml``)."""
    folder = resources.files("poisonscan") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_table(name: str) -> tuple[str, dict[str, Any]]:
    """``(where, settings)`` of the detect preset ``name``: one of :func:`presets` (a name, never a path)."""
    names = presets()
    if name not in names:
        raise ConfigError(f"--preset {name}: choose one of {', '.join(names)}")
    with resources.as_file(resources.files("poisonscan") / "presets" / f"{name}.toml") as path:
        return f"preset {name}", read_table(path, "detect")


#: the flags of ``detect`` that set a section's setting
#: what ``detect --exact`` sets: the paper's procedure for every step a faster one replaces (all B masks zeroing
#: pixels, ViTs included, every window and every null window on the whole flip set, the classifier trained on
#: every signal); ``--set`` still wins
EXACT = {"search.masking": "exact", "search.flip_testing": "exact", "search.vit_masking": "zero",
         "evidence.null_testing": "exact", "classifier.train": "always"}

DETECT_FLAGS = {"search.method": "--method", "search.masks": "--masks", "search.window": "--window",
                "search.flip_size": "--flip-size", "decision.force": "--force"}


def file_table(file: Path | str) -> dict[str, Any]:
    """The detect settings of a config file. A detect run's saved ``config.json`` (a ``.json`` file with a
    ``version`` string at its top) is one too: without its version line, its own run folder (``out``) and the
    switches of its invocation, so ``--config scan/config.json`` repeats that scan's settings into a new ``--out``;
    a setting this release does not know is refused as in any file."""
    table = read_table(file, "detect")
    if Path(file).suffix == ".json" and isinstance(table.get("version"), str):
        table = {k: v for k, v in table.items() if k not in {"version", "out", *INVOCATION_SETTINGS}}
    return table


def _file_preset(file: Path | str | None, table: dict[str, Any]) -> str | None:
    """The ``preset`` a detect config file's ``table`` names (a preset's name, checked by :func:`preset_table`)."""
    name = table.get("preset")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{file}: preset must be a preset's name, one of {', '.join(presets())}")
    return name


def detect_config(preset: str | None = None, file: Path | str | None = None,
                  flags: dict[str, Any] | None = None) -> DetectConfig:
    """``detect``'s settings: the dataclass defaults, then the preset, then the config file, then the flags
    (``section.key`` names a section's setting). The preset is ``preset`` (``--preset``), else the config file's
    ``preset`` key, else ``default``."""
    table = file_table(file) if file else {}
    name = preset or _file_preset(file, table) or "default"
    tables = [preset_table(name)] + ([(str(file), table)] if file else [])
    return resolve_config(DetectConfig, None, {**(flags or {}), "preset": name}, tables=tables,
                          flag_names=DETECT_FLAGS)


def validate_config(cfg: DetectConfig) -> None:
    """Raise ``ConfigError`` for settings the pipeline cannot run with (types, ranges and choices of every setting,
    then what no single setting shows)."""
    check_config(cfg)
    if not cfg.data:
        raise ConfigError("no data set: give DATA (a folder, file list or WebDataset shards)")
    if not cfg.model:
        raise ConfigError("no threat model: give --model CKPT")
    window = cfg.search.window
    if not (window < 1 or float(window).is_integer()):
        raise ConfigError(f"--window {window:g}: give whole pixels (17) or a fraction of the image side below 1 "
                          "(60/224, 0.27)")
    if not math.isfinite(cfg.decision.min_evidence):
        raise ConfigError("setting 'decision.min_evidence' must be a number")
    if cfg.image_size:
        check_window(window, cfg.image_size)


def check_window(window: float, image_size: int) -> None:
    """Raise ``ConfigError`` when ``window`` in pixels (>= 1) is larger than the model's ``image_size`` px images."""
    if window >= 1 and window > image_size:
        raise ConfigError(f"--window {window:g}: {window:g} px is larger than the model's {image_size} px images "
                          f"(give at most {image_size} px, or a fraction of the image side like 60/224)")
