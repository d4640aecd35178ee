"""The end-to-end chain behind ``poisonscan demo`` and ``benchmarks/run_pipeline.py``, written once.

A poisoned (or clean-control) data set -> the threat model (given, or pretrained) -> its backdoor strength ->
detect with each method -> detection quality against the ground truth -> the cleaned manifest -> (a model
pretrained again on it, and its strength) -> linear probes. Every step writes into ``work``; with ``resume`` a step
whose output is finished is read back instead of run again (an interrupted pretraining or scan resumes), so an
interrupted chain picks up where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poisonscan.config import CleanConfig, DetectConfig, EvalBackdoorConfig, EvalDetectionConfig, EvalProbeConfig
from poisonscan.config import PretrainConfig
from poisonscan.settings import configure

#: where each step writes under ``work`` (templates of ``method`` and ``fraction``)
NAMES = {"pretrain": "pretrain", "backdoor": "backdoor", "detect": "detect-{method}",
         "clean": "clean-{method}.tsv", "probe": "probe-{fraction}", "retrain": "retrain-{method}",
         "retrain_probe": "retrain-{method}/probe-{fraction}"}


@dataclass
class ChainSpec:
    """What the chain runs on and with which settings."""

    work: Path
    train: str                      # the (poisoned) training data the threat model learns and detect scans
    val: str                        # labelled clean validation data
    trigger: str                    # the trigger image and the attack's target class (name or index)
    target: str
    trigger_size: float             # the trigger's side when pasted for the strength and the probe
    truth: str | None = None        # the poison step's ground truth (None: a clean control)
    val_patched: str | None = None  # the poison step's patched val (None: the probe pastes the trigger itself)
    labelled_train: str | None = None   # the probe's labelled training data (None: ``train``)
    model: str | None = None        # a given threat model; None: pretrained with ``recipe``
    recipe: dict[str, Any] = field(default_factory=dict)    # PretrainConfig values: method, arch, image_size, epochs
    methods: tuple[str, ...] = ("poisoncam",)
    detect: dict[str, Any] = field(default_factory=dict)    # detect settings by name (see ``settings.configure``)
    strength_fraction: float = 0.01     # labelled share of the strength measure's linear probe
    probe_fractions: tuple[float, ...] = ()
    retrain_epochs: int = 0         # > 0: pretrain again on each cleaned manifest for this many epochs
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    resume: bool = False
    names: dict[str, str] = field(default_factory=dict)     # overrides of :data:`NAMES`
    say: Callable[[str], None] = lambda msg: None

    def path(self, step: str, **fmt: Any) -> Path:
        return self.work / {**NAMES, **self.names}[step].format(**fmt)

    @property
    def common(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "seed": self.seed, "quiet": True}


def run_chain(spec: ChainSpec) -> dict[str, Any]:
    """Run the chain; return ``model``, ``strength``, per method ``detect`` (the summary, ``quality`` against the
    truth, ``manifest``, ``cleaned``: the clean step's summary, and ``retrained``: model, strength, probes),
    ``probes`` by fraction and ``timings``."""
    from poisonscan.cleaning import clean_dataset
    from poisonscan.detect.pipeline import run_detect
    from poisonscan.eval.runner import run_backdoor, run_detection, run_probe

    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    model = spec.model or str(spec.path("pretrain") / "encoder.safetensors")
    if spec.model is None:
        spec.say(f"pretraining the threat model ({', '.join(f'{k} {v}' for k, v in spec.recipe.items())})")
        timed("pretrain", lambda: _pretrain(spec, spec.train, spec.path("pretrain"), spec.recipe))
    spec.say("measuring the threat model's backdoor (k-NN ASR, poison clusters, oracle flips)")
    strength = timed("backdoor", lambda: _strength(spec, model, spec.train, spec.path("backdoor"), run_backdoor))
    result: dict[str, Any] = {"model": model, "strength": strength, "detect": {}, "probes": {}, "timings": timings}
    for method in spec.methods:
        out = spec.path("detect", method=method)
        spec.say(f"detecting ({method})")
        resume = str(out) if spec.resume and (out / "config.json").is_file() else None
        cfg = configure(DetectConfig, data=spec.train, model=model, out=str(out), method=method, resume=resume,
                        overwrite=not spec.resume, **spec.common, **spec.detect)
        summary = timed(f"detect-{method}", lambda: run_detect(cfg, quiet=True))
        quality = run_detection(EvalDetectionConfig(run=str(out), truth=spec.truth)) if spec.truth else None
        manifest = spec.path("clean", method=method)
        spec.say("writing the cleaned manifest")        # written again on a resume: the removal may have changed
        cleaned = timed(f"clean-{method}", lambda: clean_dataset(CleanConfig(run=str(out), out=str(manifest))))
        row: dict[str, Any] = {"summary": summary, "quality": quality, "manifest": str(manifest),
                               "cleaned": cleaned}
        if spec.retrain_epochs and summary["counts"]["removed"] == 0:
            row["retrained"] = {"skipped": "nothing removed: retraining would repeat the threat model's run"}
        elif spec.retrain_epochs:
            spec.say(f"retraining on the cleaned manifest ({spec.retrain_epochs} epochs)")
            row["retrained"] = timed(f"retrain-{method}", lambda: _retrain(spec, method, manifest, run_backdoor,
                                                                          run_probe))
        result["detect"][method] = row
    for frac in spec.probe_fractions:
        spec.say(f"linear probe ACC/ASR of the threat model ({frac:g} of the labels)")
        result["probes"][frac] = timed(f"probe-{frac:g}", lambda: _probe(spec, model, frac,
                                                                        spec.path("probe", fraction=f"{frac:g}"),
                                                                        run_probe))
    return result


def _pretrain(spec: ChainSpec, data: str, out: Path, recipe: dict[str, Any]) -> None:
    """Pretrain ``out`` with ``recipe`` unless finished there (an interrupted pretraining resumes)."""
    from poisonscan.ssl.trainer import run_pretrain

    if (out / "stages" / "pretrain.done").exists():
        return
    run_pretrain(PretrainConfig(data=data, out=str(out), overwrite=True, **spec.common, **recipe,
                                resume=str(out) if spec.resume and (out / "last.pt").exists() else None))


def _strength(spec: ChainSpec, model: str, train: str, out: Path, run_backdoor: Callable[..., Any],
              bank: str | None = None) -> dict[str, Any]:
    truth = spec.truth if bank is None else None
    return run_backdoor(EvalBackdoorConfig(
        model=model, data=spec.val, trigger=spec.trigger, target=spec.target, train=bank or train, truth=truth,
        trigger_size=spec.trigger_size, fraction=spec.strength_fraction, out=str(out), **spec.common)) or {}


def _probe(spec: ChainSpec, model: str, frac: float, out: Path, run_probe: Callable[..., Any]) -> dict[str, Any]:
    patched = ({"val_patched": spec.val_patched} if spec.val_patched else
               {"triggers": [spec.trigger], "trigger_size": spec.trigger_size})
    return run_probe(EvalProbeConfig(model=model, train=spec.labelled_train or spec.train, val=spec.val,
                                     targets=[spec.target], fraction=frac, out=str(out), **patched,
                                     **spec.common)) or {}


def _retrain(spec: ChainSpec, method: str, manifest: Path, run_backdoor: Callable[..., Any],
             run_probe: Callable[..., Any]) -> dict[str, Any]:
    """Pretrain on the cleaned manifest with the threat model's recipe, then measure its backdoor (k-NN, probes)."""
    out = spec.path("retrain", method=method)
    recipe = {**spec.recipe, "epochs": spec.retrain_epochs}
    if recipe.get("store_cache"):                   # a cache holds one data set's decoded images
        recipe["store_cache"] = str(spec.work / f"cache-{method}")
    _pretrain(spec, str(manifest), out, recipe)
    model = str(out / "encoder.safetensors")
    strength = _strength(spec, model, str(manifest), out / "backdoor", run_backdoor)
    row = {"model": model, "strength": strength,
           "probes": {frac: _probe(spec, model, frac, spec.path("retrain_probe", method=method, fraction=f"{frac:g}"),
                                   run_probe) for frac in spec.probe_fractions}}
    knn = strength.get("knn") or {}
    if knn and knn["bank_target_count"] < knn["k"] and spec.labelled_train:
        # the cleaning took (nearly) the whole target class: its k-NN ASR is 0 by construction, so the k-NN is
        # measured again against the original labelled data, as a clean-data model's is
        row["strength_original_bank"] = _strength(spec, model, str(manifest), out / "backdoor-original-bank",
                                                  run_backdoor, bank=spec.labelled_train)
    return row
