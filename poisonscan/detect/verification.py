"""Verification of isolated flags: a second opinion from the threat model on images the neighbour consensus keeps.

The removal score (``neighbours``) keeps an image the poison classifier flags when its feature-space neighbours are
not flagged beyond chance. That keeps out clean images the classifier flags by accident, and also a few poisons the
threat model did not put beside the others (benchmarks/results/notebook.md 3b: two of imagenette-96's five missed poisons have
P > 0.9 and no support). Such an image is verified the way PoisonCAM scores a search candidate:

1. *localise*: the ``w x w`` window whose grey-out lowers the classifier's P(poisonous) the most (occlusion over a
   grid of about ``grid x grid`` positions), the region that makes the classifier flag the image;
2. *flip test*: that window is pasted on the flip test set like a search candidate, and its poison score (flip-set
   images moved to another cluster) is counted;
3. *decide*: the image is removed when its window moves more flip-set images than every one of the evidence step's
   random (null) windows cut from images the classifier does not flag (:func:`verification_bar`).

Only images with ``P > min_prob`` that the removal score keeps are verified (43-133 on 50k CIFAR-10 at 0.9), so
the step costs one flip test per candidate. Off by default (``min_prob = 1``): on the CIFAR-10 runs measured
(benchmarks/results/notebook.md section 5) the windows of clean images the classifier flags can move nearly as many flip-set
images as the trigger does, so the step gains a few poisons at a similar number of clean images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan.detect.classifier import predict_poison
from poisonscan.detect.decision import DecisionSettings
from poisonscan.detect.fliptest import FlipTest
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.records import ClassifierResult, Evidence, Verification, VerifiedFlag
from poisonscan.runtime import Runtime

#: occlusion positions per side (the stride is the free range divided by this, at least one pixel)
GRID = 24
#: grey value of the occluding window (uint8)
FILL = 128
#: occluded copies classified at once (bounded memory at any image size)
MAX_COPIES = 4096


def occlusion_grid(image_size: int, window: int, grid: int = GRID) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of the occluding windows: every ``stride``-th position, the last flush with the
    border, ``stride = max(1, ceil((image_size - window + 1) / grid))``."""
    free = image_size - window
    if free < 0:
        raise ValueError(f"window {window} is larger than the {image_size} px image")
    stride = max(1, math.ceil((free + 1) / grid))
    steps = sorted(set(range(0, free + 1, stride)) | {free})
    return [(x, y) for y in steps for x in steps]


def occlusion_windows(models: Sequence[nn.Module], images_u8: Tensor, window: int, runtime: Runtime,
                      grid: int = GRID, fill: int = FILL, batch_size: int = 256) -> tuple[Tensor, np.ndarray]:
    """For each image (uint8 n x 3 x S x S), the ``window`` x ``window`` box ``[x, y, w, h]`` whose grey-out
    lowers the classifier's P(poisonous) most, and that lowest P. Returns ``(boxes int64 n x 4, p_min float32 n)``."""
    n, size = int(images_u8.shape[0]), int(images_u8.shape[-1])
    corners = occlusion_grid(size, window, grid)
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    p_min = np.zeros(n, dtype=np.float32)
    per_chunk = max(1, MAX_COPIES // len(corners))
    for s in range(0, n, per_chunk):
        chunk = images_u8[s:s + per_chunk]
        copies = chunk.repeat_interleave(len(corners), dim=0)
        for j, (x, y) in enumerate(corners):
            copies[j::len(corners), :, y:y + window, x:x + window] = fill
        probs = predict_poison(models, copies, runtime, batch_size).reshape(len(chunk), len(corners))
        best = probs.argmin(axis=1)
        boxes[s:s + len(chunk), :2] = torch.as_tensor(corners)[torch.as_tensor(best)]
        p_min[s:s + len(chunk)] = probs[np.arange(len(chunk)), best]
    boxes[:, 2:] = window
    return boxes, p_min


def verification_candidates(probs: np.ndarray, removed: np.ndarray, min_prob: float) -> np.ndarray:
    """Indices (int64) of the images the classifier flags with ``P > min_prob`` that the removal score keeps (none
    at ``min_prob = 1``)."""
    return np.flatnonzero((np.asarray(probs) > min_prob) & ~np.asarray(removed, dtype=bool)).astype(np.int64)


def verification_bar(null_scores: Sequence[int] | np.ndarray, null_sources: Sequence[int] | np.ndarray,
                     unflagged: np.ndarray) -> int:
    """The poison score a verified window must exceed: the highest of the run's null windows cut from images the
    classifier does not flag (``unflagged``, bool N). Windows cut from flagged images are left out: with 5% poisons
    about one null window in twenty comes from a poison, and one that covers its trigger scores like the top-k.
    -1 without any null window; every null window when none comes from an unflagged image."""
    null = np.asarray(null_scores)
    if not null.size:
        return -1
    ok = np.asarray(unflagged, dtype=bool)[np.asarray(null_sources, dtype=np.int64)]
    return int(null[ok].max()) if ok.any() else int(null.max())


def run_verify(settings: DecisionSettings, images: Tensor, evidence: Evidence, classifier: ClassifierResult,
               flagged: np.ndarray, flip: FlipTest, models: Callable[[], list[nn.Module]], window: int) -> Verification:
    """The verify stage (rank 0): flip-test the window of each image the classifier flags (``P > verify_min_prob``)
    that the removal score keeps (``flagged``: the removal score's decision), removed when it moves more flip-set
    images than every null window cut from an image the classifier does not flag. ``models()`` loads the
    classifier."""
    probs = classifier.probs
    runtime, batch = flip.runtime, flip.batch_size
    cand = (verification_candidates(probs, flagged, settings.verify_min_prob) if probs is not None
            else np.zeros(0, dtype=np.int64))
    bar = (verification_bar(evidence.null_scores, evidence.null_sources, probs <= settings.threshold)
           if probs is not None else -1)
    entries: list[VerifiedFlag] = []
    if len(cand):
        nets = [m.to(runtime.device) for m in models()]
        imgs = images[torch.as_tensor(cand)]
        boxes, p_min = occlusion_windows(nets, imgs, window, runtime, batch_size=batch)
        flips = flip.scores(cut_windows(imgs, boxes), flip.clustering.labels[cand], "verify", split=False)
        entries = [VerifiedFlag(int(i), float(probs[i]), [int(v) for v in boxes[j]], float(p_min[j]), int(flips[j]),
                                bool(flips[j] > bar)) for j, i in enumerate(cand)]
    return Verification(min_prob=settings.verify_min_prob, bar=bar, n_candidates=len(entries),
                        n_verified=sum(e.verified for e in entries), candidates=entries)
