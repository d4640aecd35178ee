"""Typed configuration: one dataclass per command, the paper's defaults in one place.

Resolution order: dataclass defaults < config file (TOML, YAML or JSON) < command-line flags. Flags left at
``None`` do not override. The resolved config is written into every run directory.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import os
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from poisonscan.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The range a numeric setting must lie in: the one place both the config file and the flags read it from
    (``Range.error`` words a violation like Click's ``IntRange``/``FloatRange``)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        """``x>=1``, ``x>0.0``, ``0.0<=x<=1.0``, ... (Click's notation)."""
        if self.min is None:
            return f"x{'<' if self.max_open else '<='}{self.max}"
        if self.max is None:
            return f"x{'>' if self.min_open else '>='}{self.min}"
        return f"{self.min}{'<' if self.min_open else '<='}x{'<' if self.max_open else '<='}{self.max}"

    def error(self, value: float) -> str | None:
        """``None`` when ``value`` is in range, else Click's message (``0 is not in the range x>=1.``)."""
        low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        return f"{value} is not in the range {self.describe()}." if low or high else None


def at_least(lo: float) -> dict[str, Range]:
    """Field metadata: the setting must be ``>= lo``."""
    return {"range": Range(min=lo)}


def above(lo: float) -> dict[str, Range]:
    """Field metadata: the setting must be ``> lo``."""
    return {"range": Range(min=lo, min_open=True)}


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict[str, Range]:
    """Field metadata: the setting must lie between ``lo`` and ``hi`` (each end included unless open)."""
    return {"range": Range(min=lo, max=hi, min_open=lo_open, max_open=hi_open)}


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

#: Departures from the paper's classifier recipe (each measured in docs/benchmarks.md section 5; "paper:" gives
#: the paper's recipe back).
#: Decoys: this share of the classifier's clean training (and validation) images get a pasted window of another
#: image, so the classifier learns the trigger's content, not the traces of pasting (paper: 0).
DECOY_DEFAULT = 0.5
#: Refinement: the classifier is trained again without the training negatives the first one calls poisonous (the
#: unscored poisons among them) (paper: 1).
ROUNDS_DEFAULT = 2
#: Neighbours: an image's removal score is its classifier probability averaged with the support of its nearest
#: neighbours in the threat model's feature space, their mean probability above the data set's flag rate
#: (detect/neighbours.py) (paper: 0, the classifier probability alone).
NEIGHBOURS_DEFAULT = 10
#: What the refinement drops from the training negatives: "removal", the images the removal decision would remove
#: (P with its neighbours' support) as well as those with P > threshold; "p", the latter alone (paper: no refinement).
REFINE_BY_DEFAULT = "removal"
#: Ensemble: this many classifiers, trained with different seeds, their logits averaged, since one classifier's
#: decision varies from seed to seed (recall 94.6-99.8% on one CIFAR-10 50k run) (paper: 1).
ENSEMBLE_DEFAULT = 3
#: An optional step after the decision, off by default (1): an image the classifier flags with P above this that the
#: neighbour consensus keeps is verified by the threat model (detect/verification.py): the window the classifier
#: looks at is flip-tested like a search candidate and removes the image when it moves more flip-set images than
#: every random window of the evidence test cut from an image it does not flag. Measured in docs/benchmarks.md
#: section 5.
VERIFY_MIN_PROB_DEFAULT = 1.0
#: The poison score counts the flip-set images a candidate window moves into its own cluster ("to_source",
#: PatchSearch's rule), not every image it moves ("changed", the paper's). With many clusters and small images any
#: high-contrast window moves half the flip set, and "changed" ranks such clean windows above the trigger: on the
#: held-out tinyimagenet100 (100 classes, 32 px, 1% poisoned) 4 of the top 20 were poisons with "changed" and 16 with
#: "to_source"; on the demo both found 20 of 20 (docs/design.md, "The poison score").
SCORE_RULE_DEFAULT = "to_source"
#: When a picture recurs among the top-k (the recurrence test), every image is searched for it and the removal is
#: exactly the images that contain it (their best window at least as similar to the group's windows as the
#: recurrence test's bar): on the held-out tinyimagenet100 run the classifier removed 1,062 images (recall 93.2%,
#: precision 43.9%) while every poison's best match was at least 0.88 and every clean image's at most 0.64 against a
#: threshold of 0.87 (docs/design.md, "Finding the recurring picture"); checked on CIFAR-10 50k at 2% (trigger_12)
#: and tinyimagenet100 at 0.5% (trigger_14), where it was not chosen: both removals exactly the poisons. The
#: classifier decides for triggers that do not recur.
MATCH_PICTURE_DEFAULT = True
#: The evidence gate (detect/evidence.py): a backdoor signal needs z >= 3 and either an effect of at least 0.15 (the
#: share of the flip set the top-k move beyond random windows, set between the recorded runs of three settings:
#: the demo, imagenette-96 and CIFAR-10 50k) or one picture recurring among the top-k windows at p <= 0.01 (the
#: recurrence test, detect/recurrence.py, calibrated by each run's own random windows; its 0.99 quantile and 0.01
#: level are conventions, not fitted). The recurrence test was checked on the demo, a clean-data demo model and
#: tinyimagenet100 at 1%, and on settings nothing was chosen on: CIFAR-10 50k at 2% (trigger_12 on dog),
#: tinyimagenet100 at 0.5% (trigger_14) and a clean-data tinyimagenet100 model (docs/design.md, "The evidence gate";
#: docs/results.md).
MIN_EFFECT_DEFAULT = 0.15
MAX_RECURRENCE_P_DEFAULT = 0.01
#: the poison classifier's positives: the recurring group's windows when there is one ("recurring": top-k windows
#: outside it are left out of training), or every top-k window ("all", the paper)
CLASSIFIER_POSITIVES_DEFAULT = "recurring"


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
    resume: str | None = None
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
    overwrite: bool = False             # allow writing into a non-empty --out folder


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
    blend_alpha: float = field(default=0.2, metadata=between(0.0, 1.0, lo_open=True))
    ctrl_magnitude: float = 50.0        # CTRL reference: 50 on the training set
    ctrl_val_magnitude: float = 100.0   # ... and 100 on the test set
    # DCT block side; 0 = scaled with the image (32 px on 224 px)
    ctrl_block: int = field(default=32, metadata=at_least(0))
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
    image_size: int | None = field(default=None, metadata=at_least(8))
    out: str | None = None
    resume: str | None = None
    method: str = "poisoncam"
    clusters: int = field(default=PAPER.n_clusters, metadata=at_least(1))
    masks: int = field(default=PAPER.n_masks, metadata=at_least(1))
    window: float = field(default=PAPER.window / PAPER.reference_size, metadata=above(0.0))
    mask_strategy: str = PAPER.mask_strategy
    flip_size: int = field(default=PAPER.flip_set_size, metadata=at_least(1))
    samples_per_cluster: int = field(default=PAPER.samples_per_cluster, metadata=at_least(1))
    drop_fraction: float = field(default=PAPER.drop_fraction, metadata=between(0.0, 1.0))
    top_k: int = field(default=PAPER.top_k, metadata=at_least(1))
    drop_top: float = field(default=PAPER.drop_top, metadata=between(0.0, 0.99))
    # poison score: "to_source" (PatchSearch: flips into the candidate's own cluster) or "changed" (paper: any flip)
    score_rule: str = SCORE_RULE_DEFAULT
    aggregate: str = "sum"              # cluster score in the search: "sum" (paper) or "max" (PatchSearch)
    # random windows scored for the backdoor-evidence test (benchmarks 2c) ...
    null_size: int = field(default=1024, metadata=at_least(1))
    null_pool: str = "all"              # ... cut from any image ("outside-topk-clusters": outside the top-k's clusters)
    feature_dtype: str = "float32"      # features.npy and host copy: float32 or float16 (half the memory)
    classifier_iters: int = field(default=2000, metadata=at_least(1))
    # share of the training pool held out as extra validation negatives
    classifier_holdout: float = field(default=0.0, metadata=between(0.0, 0.5))
    # share of the classifier's negatives with a pasted natural window
    classifier_decoys: float = field(default=DECOY_DEFAULT, metadata=between(0.0, 1.0))
    # 2: retrain once without the negatives the first classifier flags
    classifier_rounds: int = field(default=ROUNDS_DEFAULT, metadata=at_least(1))
    classifier_refine_by: str = REFINE_BY_DEFAULT  # ... flags by "p" or also by the "removal" score
    # poison classifiers averaged (different seeds)
    ensemble: int = field(default=ENSEMBLE_DEFAULT, metadata=at_least(1))
    threshold: float = field(default=0.5, metadata=between(0.0, 1.0))  # removed = removal score > threshold
    # removal score = (P + support of this many feature neighbours) / 2; 0: P
    neighbours: int = field(default=NEIGHBOURS_DEFAULT, metadata=at_least(0))
    # flip-test kept images with P above this; 1: off
    verify_min_prob: float = field(default=VERIFY_MIN_PROB_DEFAULT, metadata=between(0.0, 1.0))
    # with a recurring picture, remove exactly the images that contain it (detect/matching.py)
    match_picture: bool = MATCH_PICTURE_DEFAULT
    min_evidence: float = 3.0           # evidence gate: z of the top-k over random windows ...
    # ... and the share of the images random windows leave that they move
    min_effect: float = field(default=MIN_EFFECT_DEFAULT, metadata=between(0.0, 1.0))
    # ... or a picture recurring among the top-k at this p-value (detect/recurrence.py; 0: the effect alone decides)
    max_recurrence_p: float = field(default=MAX_RECURRENCE_P_DEFAULT, metadata=between(0.0, 1.0))
    # the poison classifier's positives: "recurring" (the group, when there is one) or "all" top-k windows
    classifier_positives: str = CLASSIFIER_POSITIVES_DEFAULT
    force: bool = False
    fail_on: float | None = field(default=None, metadata=at_least(0.0))
    # exit 1 above this many unscanned samples (0 when only --fail-on)
    fail_on_unreadable: int | None = field(default=None, metadata=at_least(0))
    batch_size: int = field(default=256, metadata=at_least(1))
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
    keep_unreadable: bool = False       # keep samples the run could not scan (left out by default)
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
    trust_checkpoint: bool = False
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
    trust_checkpoint: bool = False
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


T = TypeVar("T")

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_LIST_KINDS = {bool: "a list of true/false values", int: "a list of integers", float: "a list of numbers",
               str: "a list of strings"}


@dataclass(frozen=True)
class _Spec:
    """What a field accepts: ``base`` (bool, int, float or str), a list of them, ``None`` too, a :class:`Range`."""

    base: type
    is_list: bool
    optional: bool
    range: Range | None

    def kind(self) -> str:
        text = (_LIST_KINDS if self.is_list else _KINDS)[self.base]
        return f"{text} or null" if self.optional else text


@functools.cache
def _specs(cls: type) -> dict[str, _Spec | None]:
    """The :class:`_Spec` of every field of ``cls`` (``None`` for an annotation outside the supported set)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Spec | None] = {}
    for f in fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = len(args) < len(typing.get_args(tp)), (args[0] if len(args) == 1 else None)
        is_list = typing.get_origin(tp) is list
        if is_list:
            tp = (typing.get_args(tp) or (None,))[0]
        rng = f.metadata.get("range")
        out[f.name] = _Spec(tp, is_list, optional, rng) if tp in _KINDS else None
    return out


def field_range(cls: type, name: str) -> Range | None:
    """The :class:`Range` the setting ``name`` of the config dataclass ``cls`` must lie in (``None``: any)."""
    spec = _specs(cls).get(name)
    return spec.range if spec else None


def _show(value: Any) -> str:
    """A value as the config file would spell it (``null``, ``true``, ``"abc"``, ``1.5``), on one short line."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, base: type) -> Any:
    """``value`` as ``base`` (ints widen to float, paths to str), or ``None`` when it is not one."""
    if base is bool:
        return value if isinstance(value, bool) else None
    if base is str:
        return value if isinstance(value, str) else os.fspath(value) if isinstance(value, os.PathLike) else None
    if isinstance(value, bool):                         # true/false is not a number here
        return None
    if base is int:
        return int(value) if isinstance(value, numbers.Integral) else None
    if isinstance(value, numbers.Real) and math.isfinite(value):  # NaN and infinity are not settings
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _check_value(cls: type, name: str, value: Any, subject: str) -> Any:
    """``value`` converted for the field ``name`` of ``cls``; ``ConfigError`` (worded with ``subject``) when its type
    or range is wrong."""
    spec = _specs(cls).get(name)
    if spec is None:
        return value
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{subject} must be {spec.kind()}, got null")
    if spec.is_list != isinstance(value, list | tuple):
        raise ConfigError(f"{subject} must be {spec.kind()}, got {_show(value)}")
    items = [_convert(v, spec.base) for v in (value if spec.is_list else [value])]
    if any(v is None for v in items):
        raise ConfigError(f"{subject} must be {spec.kind()}, got {_show(value)}")
    if spec.range is not None:
        for v in items:
            msg = spec.range.error(v)
            if msg:
                raise ConfigError(f"{subject}: {msg}")
    return items if spec.is_list else items[0]


def _one_line(exc: BaseException) -> str:
    """A parser's message on one line (YAML's span several lines, with a caret under the culprit)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use .toml, .yaml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {_one_line(exc)}") from None
    errors: tuple[type[BaseException], ...] = (ValueError, RecursionError)   # TOML and JSON errors are ValueErrors
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            errors += (yaml.YAMLError,)
            data = yaml.safe_load(text)
            data = {} if data is None else data
    except errors as exc:
        raise ConfigError(f"config file {path} is not valid: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"setting name {_show(key)} in {where} is not a string")
        if key.replace("-", "_") not in known:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown setting '{key}' in {where}{hint}")


def resolve_config(cls: type[T], file: Path | str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, then ``file``, then ``overrides`` (``None`` values are skipped).

    Every value is checked against its field's annotation (``int``, ``float`` (an int too), ``str``, ``bool``,
    ``X | None``, lists of them; ``true``/``false`` is not a number) and its :class:`Range` metadata; a wrong one
    raises ``ConfigError`` naming the setting and the file (``--name`` for ``overrides``).
    """
    values: dict[str, Any] = {}
    if file:
        data = _read_file(Path(file))
        # allow a [detect] / [pretrain] table in a shared file
        section = cls.__name__.removesuffix("Config").lower()
        if section in data and isinstance(data[section], dict):
            data = data[section]
        _check_keys(cls, data, str(file))
        for key, value in data.items():
            name = key.replace("-", "_")
            values[name] = _check_value(cls, name, value, f"setting '{key}' in {file}")
    if overrides:
        _check_keys(cls, overrides, "flags")
        for key, value in overrides.items():
            if value is not None:
                name = key.replace("-", "_")
                values[name] = _check_value(cls, name, value, f"--{name.replace('_', '-')}")
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
