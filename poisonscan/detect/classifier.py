"""Poison classifier (PoisonCAM IV-D, PatchSearch step 9).

A small ResNet (BasicBlock, [1, 1, 1, 1], 2 outputs) trained from scratch to tell images carrying a pasted candidate
trigger (one of the top-k windows) from original images. Training pool: every image ordered by poison score minus the
top ``drop_top`` share (noisy: likely poisons) and minus the bottom ``k`` (validation negatives); the top-k images are
the validation positives. Each training image gets a random resized crop, with probability 0.5 a pasted trigger
(positive), then colour jitter, grayscale and a horizontal flip, all batched on the device. Early stopping when the
validation F1 stalls; the weights with the best F1 (ties: lower validation loss) are kept. An ensemble averages
logits. Its P(poisonous) of every image, averaged with the image's feature-space neighbours' (``neighbours``), is
the removal score the pipeline thresholds.

Two departures from the paper's recipe, both on by default and both off with ``decoys=0``, one round
(benchmarks/results/notebook.md section 5 measures them): *decoys*, a share of the negatives (and a copy of the validation
negatives) get a pasted window of another image, so pasting alone is not evidence; *refinement*, a second training
without the negatives the first classifier flags (the poisons the search never scored).

The network and its safe persistence are detect/poison_net.py, the batched augmentation detect/augment.py; the
classifier stage (:func:`run_classifier`) asks the evidence gate first and trains only with a backdoor signal. Its
length is the split, the training loop, the refinement rounds and the stage that runs them, which share the
settings and the tensors of one training.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonscan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from poisonscan.detect.augment import colour_augment, random_paste, random_resized_crop
from poisonscan.detect.decision import DecisionSettings, refinement_neighbours
from poisonscan.detect.evidence import by_effect, evidence_gate
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.matching import held_beyond, match_decides
from poisonscan.detect.neighbours import neighbour_mean, removal_score
from poisonscan.detect.poison_net import build_classifier
from poisonscan.detect.records import ClassifierResult, Evidence, Matching, SearchResult
from poisonscan.detect.recurrence import changed_copies, trigger_group
from poisonscan.errors import PoisonscanError, UsageError
from poisonscan.runtime import Runtime, progress
from poisonscan.settings import PAPER, at_least, between, one_of

REFINE_BY = ("p", "removal")
POSITIVES = ("recurring", "all")
TRAIN_WHEN = ("unless-matched", "always")


@dataclass
class ClassifierSettings:
    """The classifier stage's settings (``[detect.classifier]``; ``--set classifier.KEY=VALUE``). Four depart from
    the paper's recipe (``--preset paper`` gives it back: decoys 0, rounds 1, ensemble 1, positives "all"); each is
    measured in docs/design.md, "The poison classifier": decoys on the demo and imagenette-96, rounds and
    ``refine_by`` on the demo, the ensemble on one CIFAR-10 50k scan, positives on the 50-class 32 px run. Together
    they were checked where the classifier shares the removal on runs none was chosen on: the demo's images with
    trigger_12 changed copy by copy (255 removed, recall 100%, precision 98.0%); alone, on tinyimagenet100 at 1%,
    they fall short (recall 98.0%, precision 86.4%, where the picture match removes exactly the poisons)."""

    iterations: int = field(default=2000, metadata=at_least(1))     # training iterations per model (PatchSearch)
    #: p, the top share by poison score left out of the training pool (likely poisons)
    drop_top: float = field(default=PAPER.drop_top, metadata=between(0.0, 0.99))
    holdout: float = field(default=0.0, metadata=between(0.0, 0.5))  # share of the pool held out as val negatives
    #: decoys: this share of the clean training (and validation) images get a pasted window of another image, so
    #: the classifier learns the trigger's content, not the traces of pasting (paper: 0)
    decoys: float = field(default=0.5, metadata=between(0.0, 1.0))
    #: refinement: the classifier is trained again without the training negatives the last one flags (the poisons
    #: the search never scored) (paper: 1)
    rounds: int = field(default=2, metadata=at_least(1))
    #: what a refinement round drops: "removal", the images the removal decision would remove (P with its
    #: neighbours' support) as well as those with P > threshold; "p", the latter alone
    refine_by: str = field(default="removal", metadata=one_of(REFINE_BY))
    #: classifiers trained with different seeds, logits averaged: one classifier's decision varies from seed to
    #: seed (recall 94.6-99.8% on one CIFAR-10 50k run) (paper: 1)
    ensemble: int = field(default=3, metadata=at_least(1))
    #: the windows learned as the trigger: the recurrence test's group when there is one ("recurring": top-k
    #: windows outside it are left out of training), or every top-k window ("all", the paper)
    positives: str = field(default="recurring", metadata=one_of(POSITIVES))
    #: channels of the network's first stage (then doubled per stage: 16, 32, 64, 128). 16 trains the classifier in
    #: 71% of the time of 32 on the demo and 48% on CIFAR-10 50k at 1%, with the same removal: chosen on the demo
    #: (removal score > 0.5: recall 100% and precision 92.9% against 93.3%) and checked end to end on CIFAR-10 50k
    #: at 1% (docs/design.md, "The poison classifier's width"); the paper and patchsearch presets keep 32
    width: int = field(default=16, metadata=between(4, 256))
    #: early stopping (a validation F1 that has not improved for 10 evaluations) may stop a model after this many
    #: iterations: chosen on the demo with ``width`` 16 (training 48 s against 89 s, removal score > 0.5: recall
    #: 100%, precision 94.0% against 92.9%) and checked end to end on CIFAR-10 50k at 1%; the presets paper and
    #: patchsearch keep a quarter of the iterations (500)
    min_iterations: int = field(default=200, metadata=at_least(0))
    #: "unless-matched": with a backdoor signal the classifier trains only where the picture match does not make
    #: the removal (no recurring picture, or one no image holds apart from the data under a signal carried by the
    #: effect or forced): the removal is then the match's, so the classifier's P would change no removed image and
    #: the stage costs nothing (measured on the demo and CIFAR-10 50k at 2%: 89 s of a 2-core scan each, the same
    #: removal; docs/design.md, "The classifier only where the match cannot decide"). "always": the classifier
    #: trains on every signal (``--exact``, the presets paper and patchsearch), its P in ``scores.csv``
    train: str = field(default="unless-matched", metadata=one_of(TRAIN_WHEN))
    #: where the positives are a trigger's copies changed one by one (a group alike by each window's own bar, or in
    #: the threat model's features, not pixel for pixel), their windows (and the decoys) are pasted turned by up to
    #: this many degrees either way;
    #: 180: any turn, no guess at how far the attacker turned the copies. Chosen on CIFAR-10 50k with `trigger_13`
    #: turned by up to 30 degrees, scaled and recoloured (0 / 10 / 30 / 180: recall 92.9 / 93.7 / 93.6 / 95.0%,
    #: precision 75.2 / 71.4 / 82.8 / 91.0%; benchmarks/results/stages/); checked on the demo's images with
    #: `trigger_11` changed (a changed copies' group: recall 99.6%, precision 91.5%; docs/design.md); 0: upright
    feature_group_turn: float = field(default=180.0, metadata=between(0.0, 180.0))

    @property
    def widths(self) -> tuple[int, ...]:
        """The four stages' channels."""
        return tuple(self.width * m for m in (1, 2, 4, 8))


@dataclass
class ClassifierConfig:
    """How one ensemble is trained; the defaults follow PatchSearch (SGD, batch 32, eval every 20) and, for what a
    user sets, :class:`ClassifierSettings`."""

    iterations: int = ClassifierSettings.iterations
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_every: int = 20
    patience: int = 10                      # evaluations without a better val F1 before stopping ...
    min_iterations: int | None = None       # ... but never before this many (None: a quarter of the iterations)
    ensemble: int = ClassifierSettings.ensemble
    min_side: float = 20 / 224              # pasted trigger side, fraction of the image side
    max_side: float = 80 / 224
    margin: float = 10 / 224                # pasted trigger distance from the border, fraction of the side
    crop_scale: tuple[float, float] = (0.2, 1.0)
    paste_prob: float = 0.5
    decoys: float = ClassifierSettings.decoys   # share of negatives that get a pasted window of another image
    turn: float = 0.0                       # pasted windows turned by up to this many degrees either way
    widths: tuple[int, ...] = ClassifierSettings().widths
    predict_batch_size: int = 256
    seed: int = 0


@dataclass
class ClassifierSplit:
    """Indices into the image store: training pool, validation positives (top-k), validation negatives."""

    train: np.ndarray
    val_pos: np.ndarray
    val_neg: np.ndarray


@dataclass
class TrainedClassifier:
    models: list[nn.Module]
    val_f1: float                            # ensemble F1 on the validation set (best weights)
    iterations: list[int]                    # iterations run per member (early stopping)
    best_iteration: list[int]
    history: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- data split


def classifier_split(scores: np.ndarray, top_k_indices: Sequence[int], drop_top: float, seed: int = 0,
                     holdout: float = 0.0, exclude: Sequence[int] = ()) -> ClassifierSplit:
    """Split the store for the classifier.

    ``scores``: poison score per image, NaN where the image was not scored (ranked lowest). Images are ordered by
    score (ties, in particular the unscored images, in a seeded random order); the top ``max(ceil(drop_top * N), k)``
    and the ``top_k_indices`` are left out of training, the bottom ``k`` become validation negatives (PatchSearch's
    rule). ``holdout`` > 0 also holds out that share of the remaining pool, drawn at random, as validation negatives:
    images like the ones the classifier will judge, so model selection sees its false positives (the bottom ``k``
    alone are the easiest negatives there are, and the F1 on them saturates within a few hundred iterations).
    ``exclude``: more images left out of training and validation (top-k images that are not positives).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    val_pos = np.asarray(list(top_k_indices), dtype=np.int64)
    k = len(val_pos)
    if k == 0:
        raise PoisonscanError("the poison classifier needs at least one top-k image")
    key = np.where(np.isnan(scores), -np.inf, scores)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(-key[shuffled], kind="stable")]       # high -> low, random among ties
    n_top = max(math.ceil(drop_top * n), k)
    excluded = np.zeros(n, dtype=bool)
    excluded[order[:n_top]] = True
    excluded[val_pos] = True
    excluded[np.asarray(list(exclude), dtype=np.int64)] = True
    rest = order[~excluded[order]]
    val_neg = rest[len(rest) - min(k, len(rest) // 2):]
    train = rest[: len(rest) - len(val_neg)]
    n_hold = min(int(round(holdout * len(train))), len(train) // 2)
    if n_hold > 0:
        held = rng.choice(len(train), n_hold, replace=False)
        keep = np.ones(len(train), dtype=bool)
        keep[held] = False
        val_neg, train = np.concatenate([val_neg, train[held]]), train[keep]
    if len(train) == 0 or len(val_neg) == 0:
        raise UsageError(f"too few images ({n}) to train the poison classifier with top-k {k} and drop-top "
                         f"{drop_top} (lower evidence.top_k / classifier.drop_top)")
    return ClassifierSplit(np.sort(train), val_pos, np.sort(val_neg))


# --------------------------------------------------------------------------------------------- batched augmentation


def _on_gpu(runtime: Runtime) -> bool:
    """Autocast and channels_last pay off on GPUs; on CPU this small ResNet trains fastest in fp32, NCHW
    (measured: bf16 + channels_last backward is several times slower there)."""
    return runtime.device.type == "cuda"


def _amp(runtime: Runtime) -> contextlib.AbstractContextManager:
    return runtime.autocast() if _on_gpu(runtime) else contextlib.nullcontext()


def _normalise(x: Tensor, channels_last: bool) -> Tensor:
    """ImageNet statistics: the classifier is trained from scratch on any data, so any fixed pair serves."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def training_batch(images_u8: Tensor, patches: Tensor, cfg: ClassifierConfig, g: torch.Generator,
                   channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """Augmented, normalised training batch and labels (1 = pasted) from a uint8 batch already on the device."""
    x = random_resized_crop(images_u8.float() / 255, cfg.crop_scale, g)
    x, labels = random_paste(x, patches.float() / 255, cfg.paste_prob, cfg.min_side, cfg.max_side, cfg.margin, g,
                             cfg.decoys, cfg.turn)
    return _normalise(colour_augment(x, g), channels_last), labels


# ------------------------------------------------------------------------------------------------------- training


def f1_score(pred: np.ndarray, target: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (target == 1)))
    fp = float(np.sum((pred == 1) & (target == 0)))
    fn = float(np.sum((pred == 0) & (target == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@torch.inference_mode()
def _logits(models: Sequence[nn.Module], images_u8: Tensor, runtime: Runtime, batch_size: int) -> Tensor:
    """Mean logits of the ensemble over ``images_u8`` (any device), float32 on CPU."""
    for m in models:
        m.eval()
    out = []
    for s in range(0, len(images_u8), batch_size):
        x = _normalise(images_u8[s:s + batch_size].to(runtime.device, non_blocking=True).float() / 255,
                       _on_gpu(runtime))
        with _amp(runtime):
            logits = torch.stack([m(x).float() for m in models]).mean(0)
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def _train_one(images_u8: Tensor, patches: Tensor, split: ClassifierSplit, val_x: Tensor, val_y: np.ndarray,
               cfg: ClassifierConfig, runtime: Runtime, member: int, bar: Any) -> tuple[nn.Module, dict[str, Any]]:
    dev = runtime.device
    seed = cfg.seed * 1009 + member
    torch.manual_seed(seed)
    model = build_classifier(images_u8.shape[-1], cfg.widths).to(dev)
    if _on_gpu(runtime):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = max(1, cfg.iterations)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    # fp16 on a GPU needs loss scaling, or small gradients round to zero (bf16 and fp32 need none)
    scaler = torch.amp.GradScaler("cuda", enabled=_on_gpu(runtime) and runtime.amp_dtype == torch.float16)
    g = torch.Generator(device=dev).manual_seed(seed)
    g_cpu = torch.Generator().manual_seed(seed)
    patches_dev = patches.to(dev)
    train = torch.as_tensor(split.train)
    perm, pos = train[torch.randperm(len(train), generator=g_cpu)], 0
    best: dict[str, Any] = {"key": (-1.0, -math.inf), "state": None, "iteration": 0, "f1": -1.0}
    stale, history, it = 0, [], 0
    min_its = cfg.iterations // 4 if cfg.min_iterations is None else cfg.min_iterations
    for it in range(1, cfg.iterations + 1):
        if pos + cfg.batch_size > len(perm):
            perm, pos = train[torch.randperm(len(train), generator=g_cpu)], 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        model.train()
        x, y = training_batch(images_u8[idx].to(dev, non_blocking=True), patches_dev, cfg, g, _on_gpu(runtime))
        with _amp(runtime):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scale = scaler.get_scale()                  # 1.0 when disabled
        scaler.update()
        if scaler.get_scale() >= scale:             # a step fp16 overflow skipped keeps its lr
            sched.step()
        bar.advance(1)
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            logits = _logits([model], val_x, runtime, cfg.predict_batch_size)
            val_loss = float(F.cross_entropy(logits, torch.as_tensor(val_y)))
            f1 = f1_score(logits.argmax(1).numpy(), val_y)
            history.append({"member": member, "iteration": it, "train_loss": float(loss.detach()),
                            "val_loss": val_loss, "val_f1": f1})
            bar.update(info=f"model {member + 1}/{cfg.ensemble} F1 {f1:.2f}")
            if (f1, -val_loss) > best["key"]:            # best weights: highest F1, then lowest loss
                stale = 0 if f1 > best["f1"] else stale + 1
                best.update(key=(f1, -val_loss), state=copy.deepcopy(model.state_dict()), iteration=it, f1=f1)
            else:
                stale += 1                                # F1 stalls: counts toward early stopping
            if stale >= cfg.patience and it >= min_its:
                bar.advance(cfg.iterations - it)
                break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return model, {"iterations": it, "best_iteration": best["iteration"], "history": history}


def decoy_validation(images_u8: Tensor, patches: Tensor, cfg: ClassifierConfig) -> Tensor:
    """The validation negatives again, each with a decoy window pasted (fixed seed), uint8."""
    g = torch.Generator().manual_seed(cfg.seed * 1009 + 7919)
    x = images_u8.float() / 255
    x, _ = random_paste(x, patches.float() / 255, 0.0, cfg.min_side, cfg.max_side, cfg.margin, g, decoy_prob=1.0)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def train_poison_classifier(images_u8: Tensor, patches: Tensor | Sequence[Tensor], split: ClassifierSplit,
                            cfg: ClassifierConfig, runtime: Runtime, quiet: bool = False) -> TrainedClassifier:
    """Train ``cfg.ensemble`` classifiers on ``images_u8`` (uint8 N x 3 x S x S) with the top-k ``patches``
    (uint8 3 x h x w each, resized at paste time) and the given ``split``; keep each one's best weights."""
    if isinstance(patches, (list, tuple)):
        side = max(max(p.shape[-2:]) for p in patches)
        patches = torch.stack([F.interpolate(p[None].float(), size=(side, side), mode="bilinear",
                                             align_corners=False, antialias=True)[0].round().clamp(0, 255)
                               .to(torch.uint8) for p in patches])
    if len(patches) == 0:
        raise PoisonscanError("the poison classifier needs at least one candidate trigger patch")
    images_u8 = torch.as_tensor(images_u8)
    val_idx = np.concatenate([split.val_pos, split.val_neg])
    val_y = np.concatenate([np.ones(len(split.val_pos)), np.zeros(len(split.val_neg))]).astype(np.int64)
    val_x = images_u8[torch.as_tensor(val_idx)]
    if cfg.decoys > 0:                # model selection also sees pasted natural windows, labelled clean
        decoys = decoy_validation(images_u8[torch.as_tensor(split.val_neg)], patches, cfg)
        val_x, val_y = torch.cat([val_x, decoys]), np.concatenate([val_y, np.zeros(len(decoys), np.int64)])
    models, iters, best_its, history = [], [], [], []
    with progress("poison classifier", total=cfg.iterations * cfg.ensemble, quiet=quiet) as bar:
        for member in range(cfg.ensemble):
            model, info = _train_one(images_u8, patches, split, val_x, val_y, cfg, runtime, member, bar)
            models.append(model)
            iters.append(info["iterations"])
            best_its.append(info["best_iteration"])
            history.extend(info["history"])
    logits = _logits(models, val_x, runtime, cfg.predict_batch_size)
    return TrainedClassifier(models, f1_score(logits.argmax(1).numpy(), val_y), iters, best_its, history)


@dataclass
class RefinedClassifier:
    result: TrainedClassifier                # the last round's classifier
    probs: np.ndarray                        # its P(poisonous) of every image
    dropped: list[int]                       # training negatives dropped before each further round
    train: np.ndarray                        # the last round's training pool


def refinement_flags(probs: np.ndarray, threshold: float, neighbours: np.ndarray | None = None) -> np.ndarray:
    """Which images a refinement round keeps out of the training negatives (bool N): ``P > threshold``, or, with
    ``neighbours``, also a removal score (P with its neighbours' support) above it."""
    flags = np.asarray(probs) > threshold
    if neighbours is not None and neighbours.shape[1] > 0:
        flags |= removal_score(probs, neighbour_mean(probs, neighbours)) > threshold
    return flags


def train_with_refinement(images_u8: Tensor, patches: Tensor | Sequence[Tensor], split: ClassifierSplit,
                          cfg: ClassifierConfig, runtime: Runtime, rounds: int = 1, threshold: float = 0.5,
                          batch_size: int = 256, quiet: bool = False,
                          neighbours: np.ndarray | None = None) -> RefinedClassifier:
    """Train, score every image, and for each further round drop from the training negatives the images the last
    classifier calls poisonous (P > ``threshold``), then train afresh on the cleaner pool.

    The pool is noisy: the poisons the search never scored sit among the negatives (a few percent of them), which
    teaches the classifier that a real trigger can be clean and leaves the traces of pasting as the safer cue. The
    paper drops the top share by poison score for that reason; a round of refinement also drops the unscored ones.
    With ``neighbours`` (N x k indices, :func:`~poisonscan.detect.neighbours.nearest_neighbours`) a negative is
    also dropped when its removal score (P with its neighbours' support) is above ``threshold``: the poisons the
    classifier half-misses sit among flagged poisons, and this round reaches them too (benchmarks/results/notebook.md 5).
    """
    train = split.train
    dropped: list[int] = []
    for r in range(max(1, rounds)):
        if r:
            flagged = refinement_flags(probs, threshold, neighbours)[train]
            dropped.append(int(flagged.sum()))
            if not flagged.any():
                break
            train = train[~flagged]
        res = train_poison_classifier(images_u8, patches, ClassifierSplit(train, split.val_pos, split.val_neg), cfg,
                                      runtime, quiet)
        probs = predict_poison(res.models, images_u8, runtime, batch_size, quiet)
    return RefinedClassifier(res, probs, dropped, train)


def predict_poison(models: Sequence[nn.Module], images_u8: Tensor, runtime: Runtime, batch_size: int = 256,
                   quiet: bool = True) -> np.ndarray:
    """P(poisonous) of every image (softmax of the ensemble's mean logits), float32 N."""
    images_u8 = torch.as_tensor(images_u8)
    probs = []
    with progress("classify", total=len(images_u8), quiet=quiet) as bar:
        for s in range(0, len(images_u8), batch_size):
            logits = _logits(models, images_u8[s:s + batch_size], runtime, batch_size)
            probs.append(torch.softmax(logits, 1)[:, 1])
            bar.advance(len(logits))
    return torch.cat(probs).numpy().astype(np.float32) if probs else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------------------- stage


def classifier_positives(settings: ClassifierSettings, evidence: Evidence, max_recurrence_p: float,
                         matching: Matching | None = None) -> list[int]:
    """The images whose windows the classifier learns as the trigger: the group of the top-k taken as one trigger's
    copies (:func:`~poisonscan.detect.recurrence.trigger_group`: the recurring picture, else the group alike in the
    threat model's features) at ``p <= max_recurrence_p`` (``positives="recurring"``), else every top-k image
    (the paper). A group the picture match found in no image apart from the data (``matching``) is a pattern common
    to the data, not the trigger: the top-k outside it then (every top-k image when none is)."""
    top = [int(i) for i in evidence.top_k]
    rec = trigger_group(evidence, max_recurrence_p)
    if settings.positives != "recurring" or rec is None:
        return top
    members = {int(i) for i in rec.members}
    pm = matching.picture_match if matching is not None else None
    if pm is not None and held_beyond(pm) == 0:
        return [i for i in top if i not in members] or top
    return [i for i in top if i in members]


def skip_reason(settings: ClassifierSettings, decision: DecisionSettings, evidence: Evidence,
                matching: Matching) -> str:
    """Why a classifier with a backdoor signal (or ``decision.force``) need not train, or "" when it must: with
    ``train = "unless-matched"``, the picture match makes the removal
    (:func:`~poisonscan.detect.matching.match_decides`)."""
    pm = matching.picture_match
    effect = by_effect(evidence, decision.min_evidence, decision.min_effect)
    changed = changed_copies(evidence, decision.max_recurrence_p)
    if settings.train != "unless-matched" or not match_decides(pm, effect, decision.force, changed):
        return ""
    if held_beyond(pm) > 0:
        return (f"the picture match makes the removal: {pm.contain} image(s) hold the recurring picture "
                f"(classifier.train = unless-matched)")
    return "no image holds the recurring picture apart from the data: the signal is withdrawn, nothing is removed"


def run_classifier(settings: ClassifierSettings, decision: DecisionSettings, images: Tensor, search: SearchResult,
                   evidence: Evidence, runtime: Runtime, neighbours: Callable[[int], np.ndarray],
                   batch_size: int = 256, seed: int = 0, quiet: bool = False,
                   matching: Matching | None = None) -> tuple[ClassifierResult, list[nn.Module]]:
    """The classifier stage: the evidence gate (:func:`~poisonscan.detect.evidence.evidence_gate` with the
    decision's thresholds), then, with a backdoor signal or ``decision.force``, and unless the picture match makes
    the removal (``matching``, :func:`skip_reason`), the poison classifier trained on the positives' windows
    (:func:`classifier_positives`) with refinement, and its P of every image. Returns the record and the ensemble
    (empty when it did not train). ``neighbours(k)``: each image's ``k`` nearest neighbours (for a refinement round
    that drops by the removal score)."""
    found, reason = evidence_gate(evidence, decision.min_evidence, decision.min_effect, decision.max_recurrence_p,
                                  decision.weak_signal_p)
    forced = bool(decision.force and not found)
    record = ClassifierResult(trained=False, ensemble=settings.ensemble, iterations=0, val_f1=None,
                              threshold=decision.threshold, backdoor_found=bool(found), forced=forced, reason=reason)
    if not (found or decision.force):
        return record, []
    matching = matching or Matching()
    record.skipped = skip_reason(settings, decision, evidence, matching)
    if record.skipped:
        return record, []
    scores = search.scores
    score_arr = np.full(len(images), np.nan)
    score_arr[list(scores)] = list(scores.values())
    top = classifier_positives(settings, evidence, decision.max_recurrence_p, matching)
    split = classifier_split(score_arr, top, settings.drop_top, seed=seed, holdout=settings.holdout,
                             exclude=[int(i) for i in evidence.top_k if int(i) not in set(top)])
    boxes = search.boxes
    patches = cut_windows(images[torch.as_tensor(top)], torch.as_tensor([boxes[i] for i in top]))
    group = trigger_group(evidence, decision.max_recurrence_p) if settings.positives == "recurring" else None
    turn = settings.feature_group_turn if group is not None and group.signature in ("changed", "features") else 0.0
    cfg = ClassifierConfig(iterations=settings.iterations, ensemble=settings.ensemble, predict_batch_size=batch_size,
                           decoys=settings.decoys, widths=settings.widths, turn=turn,
                           min_iterations=min(settings.min_iterations, settings.iterations), seed=seed)
    refine_k = refinement_neighbours(settings, decision)
    refined = train_with_refinement(images, patches, split, cfg, runtime, settings.rounds, decision.threshold,
                                    batch_size, quiet, neighbours=neighbours(refine_k) if refine_k else None)
    res = refined.result
    record.trained = True
    record.iterations = max(res.iterations)
    record.val_f1 = res.val_f1
    record.iterations_per_model = res.iterations
    record.best_iteration = res.best_iteration
    record.split = {"train": len(split.train), "val_pos": len(split.val_pos), "val_neg": len(split.val_neg)}
    record.positives = top
    record.rounds = 1 + len(refined.dropped)
    record.refinement_dropped = refined.dropped
    record.refine_by = settings.refine_by if settings.rounds > 1 else None
    record.history = res.history
    record.probs = refined.probs
    return record, res.models
