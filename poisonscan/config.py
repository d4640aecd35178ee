"""Typed configuration: one dataclass per command, the paper's defaults in one place.

Resolution order: dataclass defaults < config file (TOML, YAML or JSON) < command-line flags. Flags left at
``None`` do not override. The resolved config is written into every run directory.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from poisonscan.errors import ConfigError


@dataclass(frozen=True)
class PaperDefaults:
    """PoisonCAM's defaults (Qian et al., section VI; the same as PatchSearch where shared)."""

    n_clusters: int = 1000          # l, k-means clusters
    n_masks: int = 256              # B, masks per image
    window: int = 60                # w, masking window and candidate trigger side on 224 px images
    reference_size: int = 224       # the image side the pixel defaults refer to
    flip_set_size: int = 1000       # images in the flip test set (1 per cluster at l = 1000)
    samples_per_cluster: int = 2    # s, images scored per live cluster per search round
    drop_fraction: float = 0.25     # r, live clusters dropped per round
    top_k: int = 20                 # poison set size
    drop_top: float = 0.10          # p, top fraction by poison score left out of the classifier's negatives
    mask_strategy: str = "full"     # full coverage masking (VI-D)
    trigger_size: int = 50          # attack: trigger side on 224 px images
    train_margin: float = 0.25      # attack: corner in [m W, (1 - m) W - size] on training images
    val_margin: float = 0.10        # attack: the same on the patched validation set


PAPER = PaperDefaults()

#: the first of poisonscan's five departures from the paper's classifier recipe: this share of the poison
#: classifier's clean training (and validation) images get a pasted window of another image, so the classifier
#: learns the trigger's content, not the traces of pasting. Measured in docs/benchmarks.md section 5; 0 restores the
#: paper's recipe.
DECOY_DEFAULT = 0.5
#: ... and its second: the classifier is trained twice, the second time without the training negatives the first
#: one calls poisonous (the unscored poisons among them); 1 restores the paper's single training.
ROUNDS_DEFAULT = 2
#: ... and the third, in the removal decision: an image's removal score is its classifier probability averaged with
#: the support of its nearest neighbours in the threat model's feature space, their mean probability above the data
#: set's flag rate (detect/neighbours.py); 0 restores the paper's decision on the classifier probability alone.
NEIGHBOURS_DEFAULT = 10
#: ... the fourth, what the refinement round drops from the training negatives: "removal", the images the removal
#: decision would remove (P with its neighbours' support, NEIGHBOURS_DEFAULT) as well as those with P > threshold;
#: "p", the latter alone. ...
REFINE_BY_DEFAULT = "removal"
#: ... and the fifth: the classifier is an ensemble of this many, trained with different seeds, their logits
#: averaged, since one classifier's decision varies from seed to seed (recall 94.6-99.8% on one 50k run). With the
#: fourth it was measured in docs/benchmarks.md section 5 ("The classifier's seed"); 1 and "p" restore the paper's
#: single classifier and the earlier refinement.
ENSEMBLE_DEFAULT = 3
#: An optional step after the decision, off by default (1): an image the classifier flags with P above this that the
#: neighbour consensus keeps is verified by the threat model (detect/verification.py): the window the classifier
#: looks at is flip-tested like a search candidate and removes the image when it moves more flip-set images than
#: every random window of the evidence test cut from an image it does not flag. Measured in docs/benchmarks.md
#: section 5.
VERIFY_MIN_PROB_DEFAULT = 1.0


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
    image_size: int = 64
    epochs: int = 100
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = "auto"
    temperature: float = 0.2
    warmup_epochs: float = 1.0
    grad_clip: float | None = None
    num_workers: int = 2
    resume: str | None = None
    save_fp16: bool = False
    keep_every: int = 0                 # also keep encoder-eNNN.safetensors every N epochs (0: only the last)
    knn_val: str | None = None
    knn_every: int = 0
    backdoor_trigger: str | None = None     # with knn_val: k-NN ASR of this trigger every knn_every epochs
    backdoor_target: str | None = None      # the attack's target class (name or index)
    backdoor_trigger_size: float = PAPER.trigger_size / PAPER.reference_size
    store_cache: str | None = None      # folder caching the decoded uint8 image store (reused across runs)
    proj_hidden: int | None = None      # projector (and MoCo v3 predictor) hidden width [simclr 2048, mocov3 4096]
    proj_dim: int | None = None         # projection output width [simclr 128, mocov3 256]
    overwrite: bool = False             # allow writing into a non-empty --out folder


@dataclass
class PoisonConfig:
    data: str = ""
    out: str = ""
    targets: list[str] = field(default_factory=list)   # CLASS=TRIGGER.png
    attack: str = "patch"
    rate: float | None = None
    dataset_rate: float | None = None
    trigger_size: float = PAPER.trigger_size / PAPER.reference_size
    margin: float = PAPER.train_margin
    val_margin: float = PAPER.val_margin
    opacity: float = 1.0
    blend_alpha: float = 0.2
    ctrl_magnitude: float = 50.0        # CTRL reference: 50 on the training set
    ctrl_val_magnitude: float = 100.0   # ... and 100 on the test set
    ctrl_block: int = 32                # DCT block side; 0 = scaled with the image (32 px on 224 px)
    val: str | None = None
    seed: int = 0
    overwrite: bool = False
    link: bool = False
    preset: str | None = None
    shared_data: str | None = None      # presets' data root (default $POISONSCAN_DATA, else ../shared/data)


@dataclass
class DetectConfig(CommonConfig):
    data: str = ""
    model: str = ""
    arch: str | None = None
    image_size: int | None = None
    out: str | None = None
    resume: str | None = None
    method: str = "poisoncam"
    clusters: int = PAPER.n_clusters
    masks: int = PAPER.n_masks
    window: float = PAPER.window / PAPER.reference_size
    mask_strategy: str = PAPER.mask_strategy
    flip_size: int = PAPER.flip_set_size
    samples_per_cluster: int = PAPER.samples_per_cluster
    drop_fraction: float = PAPER.drop_fraction
    top_k: int = PAPER.top_k
    drop_top: float = PAPER.drop_top
    score_rule: str = "changed"         # poison score: "changed" (paper) or "to_source" (PatchSearch)
    aggregate: str = "sum"              # cluster score in the search: "sum" (paper) or "max" (PatchSearch)
    null_size: int = 1024               # random windows scored for the backdoor-evidence test (benchmarks 2c) ...
    null_pool: str = "all"              # ... cut from any image ("outside-topk-clusters": outside the top-k's clusters)
    feature_dtype: str = "float32"      # features.npy and host copy: float32 or float16 (half the memory)
    classifier_iters: int = 2000
    classifier_holdout: float = 0.0     # share of the training pool held out as extra validation negatives
    classifier_decoys: float = DECOY_DEFAULT  # share of the classifier's negatives with a pasted natural window
    classifier_rounds: int = ROUNDS_DEFAULT   # 2: retrain once without the negatives the first classifier flags
    classifier_refine_by: str = REFINE_BY_DEFAULT  # ... flags by "p" or also by the "removal" score
    ensemble: int = ENSEMBLE_DEFAULT    # poison classifiers averaged (different seeds)
    threshold: float = 0.5              # removed = removal score > threshold
    neighbours: int = NEIGHBOURS_DEFAULT  # removal score = (P + support of this many feature neighbours) / 2; 0: P
    verify_min_prob: float = VERIFY_MIN_PROB_DEFAULT  # flip-test kept images with P above this; 1: off
    min_evidence: float = 3.0           # evidence gate: z of the top-k over random windows ...
    min_effect: float = 0.15            # ... and the share of the images random windows leave that they move
    force: bool = False
    fail_on: float | None = None
    batch_size: int = 256
    trust_checkpoint: bool = False
    overwrite: bool = False


@dataclass
class CleanConfig:
    run: str | None = None
    source: str | None = None
    removed: str | None = None
    out: str = ""
    reshard: str | None = None
    strict: bool = False
    shard_size: int = 5000
    compress: bool = False


@dataclass
class EvalDetectionConfig:
    run: str = ""
    truth: str = ""
    csv: str | None = None
    plots: str | None = None
    topk: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])   # retrieved-trigger cut-offs
    fpr: list[float] = field(default_factory=lambda: [0.001, 0.01])         # TPR at these FPRs


@dataclass
class EvalProbeConfig(CommonConfig):
    model: str = ""
    arch: str | None = None
    image_size: int | None = None
    trust_checkpoint: bool = False
    train: str = ""
    val: str = ""
    val_patched: str | None = None
    triggers: list[str] = field(default_factory=list)     # one for every target, or one per target
    targets: list[str] = field(default_factory=list)
    trigger_size: float = PAPER.trigger_size / PAPER.reference_size
    margin: float = PAPER.val_margin
    fraction: float = 0.01
    epochs: int = 100
    optimizer: str = "sgd"
    lr: float | None = None                               # default 0.1 x probe_batch / 256 (SGD), 1e-3 (Adam)
    probe_batch: int = 256
    batch_size: int = 256                                 # feature extraction
    out: str | None = None


@dataclass
class EvalBackdoorConfig(CommonConfig):
    model: str = ""
    arch: str | None = None
    image_size: int | None = None
    trust_checkpoint: bool = False
    data: str = ""
    trigger: str = ""
    target: str = ""
    train: str | None = None
    truth: str | None = None
    k: int = 20
    temperature: float = 0.07
    clusters: int = PAPER.n_clusters                       # capped at N // 50 like detect
    trigger_size: float = PAPER.trigger_size / PAPER.reference_size
    margin: float = PAPER.val_margin
    attack: str = "patch"                                  # patch, blend or ctrl: how the trigger is applied
    blend_alpha: float = 0.2                               # blend: trigger weight
    ctrl_magnitude: float = 100.0                          # ctrl: the reference's test-set magnitude
    ctrl_block: int = 0                                    # ctrl: DCT block side; 0 = scaled with the image
    fraction: float = 0.01
    epochs: int = 100
    batch_size: int = 256
    out: str | None = None


@dataclass
class DemoConfig(CommonConfig):
    data: str | None = None          # your own labelled training set instead of the bundled one (needs --pretrain)
    val: str | None = None           # its labelled validation set
    trigger: str | None = None
    target: str | None = None
    out: str | None = None
    pretrain: bool = False           # train the threat model instead of using the bundled one
    epochs: int | None = None        # pretraining epochs with --pretrain
    retrain_epochs: int = 0          # retrain on the cleaned manifest and probe again (0: skip)
    limit: int | None = None         # reduced budget: an evenly spaced subset of this many training images
    masks: int | None = None         # reduced budget: masks per image (default: the paper's 256)
    classifier_iters: int | None = None  # reduced budget: poison-classifier iterations


T = TypeVar("T")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key.replace("-", "_") not in known:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown setting '{key}' in {where}{hint}")


def resolve_config(cls: type[T], file: Path | str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, then ``file``, then ``overrides`` (``None`` values are skipped)."""
    values: dict[str, Any] = {}
    if file:
        data = _read_file(Path(file))
        # allow a [detect] / [pretrain] table in a shared file
        section = cls.__name__.removesuffix("Config").lower()
        if section in data and isinstance(data[section], dict):
            data = data[section]
        _check_keys(cls, data, str(file))
        values.update({k.replace("-", "_"): v for k, v in data.items()})
    if overrides:
        _check_keys(cls, overrides, "flags")
        values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (Paths as str)."""
    if not is_dataclass(cfg):
        raise TypeError("not a config dataclass")
    return json.loads(json.dumps(asdict(cfg), default=str))


def defaults_of(cls: type) -> dict[str, Any]:
    """The default value of every field of ``cls`` (for docs and tests)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out
