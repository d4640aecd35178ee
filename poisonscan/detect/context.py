"""What the detect stages share while a run goes: the :class:`Context` (settings, runtime, run folder, the arrays
each finished stage leaves), the seeded generators, the work split across ranks, and the decision's arithmetic
over the context (the removal score, the verified flags, the removal).

Every random draw comes from a generator seeded by ``(seed, purpose, round)`` (:func:`derive_seed`) before the
work is split, so a result does not depend on the world size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.config import DetectConfig
from poisonscan.data.store import ImageStore
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.decision import removal_scores
from poisonscan.detect.gradcam import gradcam_batch_size, gradcam_candidates
from poisonscan.detect.masking import cluster_activation_masking, window_pixels
from poisonscan.detect.neighbours import nearest_neighbours
from poisonscan.detect.search import draw_positions, flip_test_set, poison_scores
from poisonscan.runs import RunDir


STAGES = ("store", "features", "clusters", "search", "evidence", "classifier", "verify", "outputs")


RoundHook = Callable[[int], None]


def derive_seed(seed: int, *tags: Any) -> int:
    """A stable 63-bit seed for ``(seed, *tags)`` (the same in every process and Python run)."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_gen(seed: int, *tags: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


@dataclass
class Context:
    cfg: DetectConfig
    runtime: rt.Runtime
    run: RunDir
    quiet: bool
    on_round: RoundHook | None
    encoder: nn.Module | None = None
    enc_meta: dict[str, Any] = field(default_factory=dict)
    store: ImageStore | None = None
    source: Any = None                          # the data source, opened before the run folder was written
    features: np.ndarray | None = None
    clustering: Clustering | None = None
    flip: np.ndarray | None = None
    search: dict[str, Any] | None = None
    evidence: dict[str, Any] | None = None
    classifier: dict[str, Any] | None = None
    probs: np.ndarray | None = None             # the classifier's P(poisonous), N
    neighbour_probs: np.ndarray | None = None   # mean P of each image's nearest neighbours (features), N
    neighbour_index: np.ndarray | None = None   # those neighbours' indices, N x k
    removal: np.ndarray | None = None           # the removal score thresholded by the decision, N
    verify: dict[str, Any] | None = None        # verify.json: the isolated flags flip-tested, and which passed
    match: np.ndarray | None = None             # each image's best similarity to the recurring picture, N
    timings: dict[str, float] = field(default_factory=dict)
    stage_start: float = 0.0
    _flip_cache: tuple[Tensor, Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.encoder.image_size)

    @property
    def window(self) -> int:
        return window_pixels(self.cfg.search.window, self.size)

    def flip_data(self) -> tuple[Tensor, Tensor]:
        """The flip test set's images (uint8) and their cluster labels."""
        if self.flip is None:
            self.flip = flip_test_set(self.clustering, self.features, self.cfg.search.flip_size, self.cfg.clusters)
        if self._flip_cache is None:
            idx = torch.as_tensor(self.flip)
            self._flip_cache = (self.store.images[idx], torch.as_tensor(self.clustering.labels[self.flip]))
        return self._flip_cache


def split_gather(runtime: rt.Runtime, n: int, work: Callable[[range], Any]) -> list[Any]:
    """Run ``work`` on this rank's contiguous share of ``range(n)``; the shares of all ranks, in rank order."""
    shard = rt.shard_indices(n, runtime.rank, runtime.world_size)
    part = work(shard)
    return rt.all_gather_object(part) if runtime.world_size > 1 else [part]


def flip_scores(ctx: Context, patches: Tensor, sources: np.ndarray | None, *tags: Any,
                 split: bool = True) -> np.ndarray:
    """Poison scores of ``patches`` (n x 3 x w x w) on the flip set; positions drawn from ``(seed, *tags)`` before
    the candidates are split across ranks (``split=False``: all on this rank, for the stages rank 0 runs alone)."""
    flip_images, flip_labels = ctx.flip_data()
    positions = draw_positions(len(patches), len(flip_images), torch_gen(ctx.cfg.seed, "paste", *tags))
    rule = ctx.cfg.search.score_rule

    def work(shard: range) -> np.ndarray:
        sl = slice(shard.start, shard.stop)
        return poison_scores(ctx.encoder, ctx.clustering, flip_images, flip_labels, patches[sl], ctx.runtime, None,
                             batch_size=ctx.cfg.batch_size, rule=rule,
                             source_clusters=sources[sl] if rule == "to_source" else None,
                             positions=positions[sl], quiet=True)

    parts = split_gather(ctx.runtime, len(patches), work) if split else [work(range(len(patches)))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def candidates(ctx: Context, indices: np.ndarray, masks: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate windows of the images ``indices``, split across ranks: (attention float16 n x S x S, boxes n x 4,
    eta n)."""
    def work(shard: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        imgs = ctx.store.images[torch.as_tensor(indices[shard.start:shard.stop])]
        if ctx.cfg.search.method == "patchsearch":
            att, boxes, eta = gradcam_candidates(ctx.encoder, ctx.clustering, imgs, ctx.window, ctx.runtime,
                                                 batch_size=gradcam_batch_size(ctx.cfg.batch_size))
        else:
            att, boxes, eta = cluster_activation_masking(ctx.encoder, ctx.clustering, imgs, masks, ctx.runtime,
                                                         batch_size=ctx.cfg.batch_size, window=ctx.window)
        return att.numpy().astype(np.float16), boxes.numpy().astype(np.int64), eta.numpy().astype(np.int64)

    parts = split_gather(ctx.runtime, len(indices), work)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def scores_of(ctx: Context) -> dict[int, int]:
    return {int(e["index"]): int(e["poison_score"]) for e in ctx.search["scored"]}


def boxes_of(ctx: Context) -> dict[int, list[int]]:
    return {int(e["index"]): [int(v) for v in e["box"]] for e in ctx.search["scored"]}


def null_sources_of(ctx: Context) -> np.ndarray:
    """The images the null windows were cut from (recorded in evidence.json)."""
    return np.asarray(ctx.evidence["null_sources"], dtype=np.int64)


def neighbours_of(ctx: Context, k: int) -> np.ndarray:
    """Each image's ``k`` nearest neighbours in the threat model's feature space (searched once per run)."""
    if ctx.neighbour_index is None or ctx.neighbour_index.shape[1] != k:
        ctx.neighbour_index = nearest_neighbours(ctx.features, k, ctx.clustering.centroids)
    return ctx.neighbour_index


def decide(ctx: Context) -> np.ndarray:
    """Removal scores (the classifier's P averaged with its feature-space neighbours', see ``neighbours``) and the
    removal decision ``score > threshold``; nothing is removed without a trained classifier."""
    if ctx.probs is None:
        return np.zeros(len(ctx.store), dtype=bool)
    k = int(ctx.cfg.decision.neighbours)
    ctx.neighbour_probs, ctx.removal = removal_scores(ctx.probs, neighbours_of(ctx, k) if k > 0 else None)
    return ctx.removal > ctx.cfg.decision.threshold


def verified_of(ctx: Context, verify: dict[str, Any] | None) -> np.ndarray:
    """Bool N: the images the verification step removes (on top of the removal score's decision)."""
    out = np.zeros(len(ctx.store), dtype=bool)
    out[[e["index"] for e in (verify or {}).get("candidates", []) if e["verified"]]] = True
    return out


def removed_of(ctx: Context) -> np.ndarray:
    """Bool N, the removal: the images that contain the recurring picture when it was searched for (the
    classifier's flags without it are kept, images with it that the classifier kept are removed); else the removal
    score's decision and the verified flags."""
    pm = (ctx.verify or {}).get("picture_match")
    if pm is not None and ctx.match is not None:
        return ctx.match >= pm["threshold"] - 1e-9
    return decide(ctx) | verified_of(ctx, ctx.verify)
