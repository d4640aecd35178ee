"""Poisonous image search (PoisonCAM IV-C): flip test set, poison scores, the iterative cluster search, and the
search stage (:func:`run_search`) that puts them together with the candidate windows of detect/masking.py (or
detect/gradcam.py for PatchSearch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.detect.clustering import ASSIGN_CHUNK, Clustering
from poisonscan.detect.features import encode, eval_mode, prepare_encoder
from poisonscan.detect.gradcam import gradcam_batch_size, gradcam_candidates
from poisonscan.detect.masking import (STRATEGIES, MaskingConfig, cluster_activation_masking, cut_windows,
                                       make_masks)
from poisonscan.detect.records import ScoredImage, SearchResult
from poisonscan.detect.seeds import derive_seed, torch_gen
from poisonscan.settings import PAPER, above, at_least, between, one_of

METHODS = ("poisoncam", "patchsearch")
RULES = ("changed", "to_source")
AGGREGATES = ("sum", "max")


@dataclass
class SearchSettings:
    """The search stage's settings (``[detect.search]``; ``--set search.KEY=VALUE``): how candidate windows are
    found and scored. Defaults are the paper's (section VI) except ``score_rule``."""

    #: candidate windows: "poisoncam" (cluster activation masking) or "patchsearch" (Grad-CAM, the baseline)
    method: str = field(default="poisoncam", metadata=one_of(METHODS))
    masks: int = field(default=PAPER.n_masks, metadata=at_least(1))                  # B, masks per image
    #: w, the masking window and candidate side: a fraction of the image side (< 1) or pixels
    window: float = field(default=PAPER.window / PAPER.reference_size, metadata=above(0.0))
    mask_strategy: str = field(default=PAPER.mask_strategy, metadata=one_of(STRATEGIES))   # full coverage (VI-D)
    flip_size: int = field(default=PAPER.flip_set_size, metadata=at_least(1))        # the flip test set's images
    samples_per_cluster: int = field(default=PAPER.samples_per_cluster, metadata=at_least(1))   # s
    drop_fraction: float = field(default=PAPER.drop_fraction, metadata=between(0.0, 1.0))        # r
    #: The poison score counts the flip-set images a candidate window moves into its own cluster ("to_source",
    #: PatchSearch's rule), not every image it moves ("changed", the paper's). With many clusters and small images
    #: any high-contrast window moves half the flip set, and "changed" ranks such clean windows above the trigger:
    #: on tinyimagenet100 (100 classes, 32 px, 1% poisoned; the setting this was chosen on) 4 of the top 20 were
    #: poisons with "changed" and 16 with "to_source"; on the demo both found 20 of 20; checked on CIFAR-10 50k at
    #: 2% and tinyimagenet100 at 0.5% (docs/design.md, "The poison score").
    score_rule: str = field(default="to_source", metadata=one_of(RULES))
    #: a cluster's score in the search: "sum" (paper) or "max" (PatchSearch)
    aggregate: str = field(default="sum", metadata=one_of(AGGREGATES))


# -- flip test set ------------------------------------------------------------------------------------------------

def flip_test_set(clustering: Clustering, features: np.ndarray, size: int = PAPER.flip_set_size,
                  requested_clusters: int = PAPER.n_clusters) -> np.ndarray:
    """Indices of the images nearest each cluster centre (the fixed test set X^f).

    ``per_cluster = max(1, size // requested_clusters)`` nearest images of every non-empty cluster (1 per cluster at
    the paper's 1000 / 1000); when the cluster count was capped for a small data set the flip set shrinks with it.
    Distances are recomputed from ``features``; ties go to the smaller index. Sorted by cluster, then distance.
    """
    labels = clustering.labels
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} cluster labels")
    per_cluster = max(1, int(size) // max(1, int(requested_clusters)))
    dist = np.empty(labels.shape[0], np.float32)
    for start in range(0, labels.shape[0], ASSIGN_CHUNK):
        stop = min(start + ASSIGN_CHUNK, labels.shape[0])
        chunk = np.asarray(features[start:stop], dtype=np.float32)
        dist[start:stop] = np.linalg.norm(chunk - clustering.centroids[labels[start:stop]], axis=1)
    index = np.arange(labels.shape[0])
    order = np.lexsort((index, dist, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(order.shape[0]) - starts
    return order[rank < per_cluster].astype(np.int64)


# -- pasting ------------------------------------------------------------------------------------------------------

def draw_positions(n_candidates: int, n_images: int, generator: torch.Generator | int) -> Tensor:
    """Uniform numbers ``n_candidates x n_images x 2`` in [0, 1) fixing where each candidate lands on each image.

    Drawn before any batching or splitting across ranks, so scores do not depend on the batch size or world size;
    :func:`positions_to_corners` turns them into top-left corners for a given patch size.
    """
    gen = torch_generator(generator)
    return torch.rand(n_candidates, n_images, 2, generator=gen, dtype=torch.float64)


def positions_to_corners(u: Tensor, image_hw: tuple[int, int], patch_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(x, y)`` top-left corners (int64) of a patch kept fully inside the image, from uniforms ``u`` (... x 2)."""
    (h, w), (ph, pw) = image_hw, patch_hw
    if ph > h or pw > w:
        raise ValueError(f"patch {ph}x{pw} does not fit in a {h}x{w} image")
    xs = (u[..., 0] * (w - pw + 1)).floor().long().clamp_(0, w - pw)
    ys = (u[..., 1] * (h - ph + 1)).floor().long().clamp_(0, h - ph)
    return xs, ys


def paste_at(images: Tensor, patches: Tensor, xs: Tensor, ys: Tensor, inplace: bool = False) -> Tensor:
    """Paste ``patches`` (n x 3 x h x w, one per image, or 3 x h x w for all) into a copy of ``images`` (n x 3 x H x W)
    (into ``images`` itself with ``inplace``) with top-left corners ``(xs, ys)``: one advanced-indexing write."""
    out = images if inplace else images.clone()
    n, c = images.shape[:2]
    ph, pw = patches.shape[-2:]
    dev = images.device
    rows = ys.to(dev)[:, None] + torch.arange(ph, device=dev)  # n x h
    cols = xs.to(dev)[:, None] + torch.arange(pw, device=dev)  # n x w
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    src = patches.to(device=dev, dtype=images.dtype)
    out[ni, ci, rows[:, None, :, None], cols[:, None, None, :]] = src if src.ndim == 4 else src.unsqueeze(0)
    return out


def paste_patches(images_u8: Tensor, patch: Tensor, generator: torch.Generator | int) -> Tensor:
    """A copy of ``images_u8`` (n x 3 x H x W) with ``patch`` (3 x h x w uint8) pasted fully inside each image at a
    random position (vectorised)."""
    u = draw_positions(1, images_u8.shape[0], generator)[0]
    xs, ys = positions_to_corners(u, tuple(images_u8.shape[-2:]), tuple(patch.shape[-2:]))
    return paste_at(images_u8, patch, xs, ys)


# -- poison score -------------------------------------------------------------------------------------------------

def poison_scores(encoder: nn.Module, clustering: Clustering, flip_images_u8: Tensor, flip_labels: Tensor,
                  patches: Sequence[Tensor] | Tensor, runtime: rt.Runtime, generator: torch.Generator | int,
                  batch_size: int = 256, rule: str = "changed", source_clusters: Sequence[int] | Tensor | None = None,
                  positions: Tensor | None = None, quiet: bool = True) -> np.ndarray:
    """Poison score of each candidate patch on the flip test set (int64, one per patch).

    Each patch is pasted at a random position on every flip image, the patched images are re-encoded
    (L2-normalised) and re-assigned. ``rule="changed"`` (paper): the number of flip images whose cluster differs
    from ``flip_labels``. ``rule="to_source"`` (PatchSearch): the number of flip images not in the candidate's own
    cluster (``source_clusters``) that move into it. Batches hold ``batch_size`` (candidate, flip image) pairs, so
    the batch never depends on the flip-set size. ``positions`` (n_patches x n_flip x 2 uniforms from
    :func:`draw_positions`) replaces ``generator`` when the caller splits candidates across ranks.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: choose one of {', '.join(RULES)}")
    plist = list(patches) if not isinstance(patches, Tensor) or patches.ndim == 4 else [patches]
    n_cand, n_flip = len(plist), int(flip_images_u8.shape[0])
    if n_cand == 0 or n_flip == 0:
        return np.zeros(n_cand, dtype=np.int64)
    if flip_labels.shape[0] != n_flip:
        raise ValueError("one flip label per flip image is needed")
    if rule == "to_source":
        if source_clusters is None or len(source_clusters) != n_cand:
            raise ValueError('rule "to_source" needs one source cluster per patch')
    u = positions if positions is not None else draw_positions(n_cand, n_flip, generator)
    if tuple(u.shape) != (n_cand, n_flip, 2):
        raise ValueError(f"positions must be {n_cand} x {n_flip} x 2, got {tuple(u.shape)}")

    device = runtime.device
    prepare_encoder(encoder, runtime)
    scores = torch.zeros(n_cand, dtype=torch.int64, device=device)
    hw = (int(flip_images_u8.shape[-2]), int(flip_images_u8.shape[-1]))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(plist):
        groups.setdefault((int(p.shape[-2]), int(p.shape[-1])), []).append(i)
    with eval_mode(encoder), torch.inference_mode(), rt.progress("poison scores", n_cand * n_flip, quiet) as bar:
        flip_dev = flip_images_u8.to(device)
        flip_lab = torch.as_tensor(flip_labels).to(device=device, dtype=torch.int64)
        src_all = (torch.as_tensor(source_clusters).to(device=device, dtype=torch.int64)
                   if rule == "to_source" else None)
        for patch_hw, members in groups.items():
            cand = torch.tensor(members, dtype=torch.int64)
            cand_dev = cand.to(device)
            stack = torch.stack([plist[i] for i in members]).to(device=device, dtype=torch.uint8)
            xs, ys = positions_to_corners(u[cand], hw, patch_hw)  # len(members) x n_flip each
            xs, ys = xs.to(device), ys.to(device)
            total = len(members) * n_flip
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                pair = torch.arange(start, stop, device=device)
                ci, fi = pair // n_flip, pair % n_flip
                imgs = paste_at(flip_dev[fi], stack[ci], xs[ci, fi], ys[ci, fi], inplace=True)
                new_lab, _ = clustering.assign_torch(encode(encoder, imgs, runtime, to_cpu=False))
                if rule == "changed":
                    hit = new_lab != flip_lab[fi]
                else:
                    src = src_all[cand_dev[ci]]
                    hit = (new_lab == src) & (flip_lab[fi] != src)
                scores.index_add_(0, cand_dev[ci], hit.long())
                bar.advance(stop - start)
    return scores.cpu().numpy()


# -- iterative search ---------------------------------------------------------------------------------------------

@dataclass
class SearchRounds:
    """Every poison score computed by the search (``scores``: image index -> score), the ``order`` in which images
    were scored, one entry per round in ``rounds`` and the final aggregated ``cluster_scores``."""

    scores: dict[int, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    cluster_scores: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (keys as strings are avoided: scores as ``[index, score]`` pairs in scoring order)."""
        return {"scored": [[i, int(self.scores[i])] for i in self.order], "rounds": self.rounds,
                "cluster_scores": [[c, float(s)] for c, s in sorted(self.cluster_scores.items())]}


def _numpy_generator(generator: np.random.Generator | int) -> np.random.Generator:
    return generator if isinstance(generator, np.random.Generator) else np.random.default_rng(int(generator))


def torch_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def iterative_search(cluster_labels: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray],
                     samples_per_cluster: int = PAPER.samples_per_cluster,
                     drop_fraction: float = PAPER.drop_fraction, generator: np.random.Generator | int = 0,
                     already_scored: dict[int, int] | None = None,
                     on_round: Callable[[SearchRounds], None] | None = None, aggregate: str = "sum",
                     stop_below: int = 1) -> SearchRounds:
    """Heuristic search of IV-C: score a few images per live cluster each round, drop the least poisonous clusters.

    The visiting order inside every cluster is one random permutation drawn up front from ``generator``. Each round
    takes the next ``samples_per_cluster`` images of every live cluster and scores the ones not in
    ``already_scored`` with a single ``score_fn(indices)`` call (so the caller batches masking and flip tests);
    a cluster's score is the ``aggregate`` ("sum": paper; "max": PatchSearch) of all its scored images. Clusters
    with no unscored image left retire, then the lowest ``drop_fraction`` of the remaining live clusters (at least
    one; ties: the smaller cluster id goes first) are dropped, until fewer than ``stop_below`` clusters are live
    (1: until none; PatchSearch stops below 4). ``on_round(result)`` runs after every round (checkpointing): with
    the same generator seed and the scores it saved as ``already_scored`` a resumed search repeats the same rounds
    and returns the same result, calling ``score_fn`` only for the missing images.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: choose one of {', '.join(AGGREGATES)}")
    if samples_per_cluster < 1 or not 0.0 <= drop_fraction <= 1.0:
        raise ValueError("samples_per_cluster must be >= 1 and drop_fraction in [0, 1]")
    labels = np.asarray(cluster_labels, dtype=np.int64)
    rng = _numpy_generator(generator)
    cache = {int(k): int(v) for k, v in (already_scored or {}).items()}
    queues: dict[int, np.ndarray] = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        queues[int(c)] = members[rng.permutation(members.shape[0])]
    pointer = {c: 0 for c in queues}
    live = sorted(queues)
    result = SearchRounds()
    per_cluster: dict[int, list[int]] = {c: [] for c in queues}
    rnd = 0
    while live and len(live) >= stop_below:
        rnd += 1
        picked: list[int] = []
        for c in live:
            take = queues[c][pointer[c]:pointer[c] + samples_per_cluster]
            pointer[c] += take.shape[0]
            picked.extend(int(i) for i in take)
        missing = np.array([i for i in picked if i not in cache], dtype=np.int64)
        if missing.size:
            got = np.asarray(score_fn(missing)).reshape(-1)
            if got.shape[0] != missing.shape[0]:
                raise ValueError(f"score_fn returned {got.shape[0]} scores for {missing.shape[0]} images")
            cache.update({int(i): int(s) for i, s in zip(missing, got)})
        for i in picked:
            result.scores[i] = cache[i]
            result.order.append(i)
            per_cluster[int(labels[i])].append(cache[i])
        agg = {c: float((sum if aggregate == "sum" else max)(per_cluster[c])) if per_cluster[c] else 0.0
               for c in live}
        result.cluster_scores.update(agg)
        retired = [c for c in live if pointer[c] >= queues[c].shape[0]]
        remaining = [c for c in live if pointer[c] < queues[c].shape[0]]
        n_drop = min(len(remaining), max(1, int(drop_fraction * len(remaining)))) if remaining else 0
        dropped = sorted(remaining, key=lambda c: (agg[c], c))[:n_drop]
        result.rounds.append({"round": rnd, "live_clusters": len(live), "scored": len(picked),
                              "computed": int(missing.size), "retired": len(retired), "dropped": len(dropped)})
        gone = set(retired) | set(dropped)
        live = [c for c in live if c not in gone]
        if on_round is not None:
            on_round(result)
    return result


def top_k(scores: dict[int, int], k: int = PAPER.top_k) -> list[int]:
    """The ``k`` highest-scoring image indices, ties broken by the smaller index (deterministic)."""
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, int(k))]]


# -- the flip test and the search stage ---------------------------------------------------------------------------

@dataclass
class FlipTest:
    """The flip test set (``index``: its image indices; ``images`` uint8, ``labels`` their clusters) and what
    scores a window on it: the threat model, the clustering and the score ``rule``. Shared by the search, the
    evidence and the verify stages."""

    encoder: nn.Module
    clustering: Clustering
    index: np.ndarray
    images: Tensor
    labels: Tensor
    runtime: rt.Runtime
    seed: int
    rule: str = "changed"
    batch_size: int = 256

    @classmethod
    def of(cls, encoder: nn.Module, clustering: Clustering, store_images: Tensor, index: np.ndarray,
           runtime: rt.Runtime, seed: int, rule: str, batch_size: int) -> FlipTest:
        """The flip test on the images ``index`` of ``store_images`` (:func:`flip_test_set` chooses them)."""
        index = np.asarray(index, dtype=np.int64)
        return cls(encoder, clustering, index, store_images[torch.as_tensor(index)],
                   torch.as_tensor(clustering.labels[index]), runtime, seed, rule, batch_size)

    def scores(self, patches: Tensor, sources: np.ndarray | None, *tags: Any, split: bool = True) -> np.ndarray:
        """Poison scores of ``patches`` (n x 3 x w x w; ``sources``: their images' clusters, for "to_source");
        positions drawn from ``(seed, "paste", *tags)`` before the candidates are split across ranks
        (``split=False``: all on this rank, for the stages rank 0 runs alone)."""
        positions = draw_positions(len(patches), len(self.images), torch_gen(self.seed, "paste", *tags))

        def work(shard: range) -> np.ndarray:
            sl = slice(shard.start, shard.stop)
            return poison_scores(self.encoder, self.clustering, self.images, self.labels, patches[sl], self.runtime,
                                 None, batch_size=self.batch_size, rule=self.rule,
                                 source_clusters=sources[sl] if self.rule == "to_source" else None,
                                 positions=positions[sl], quiet=True)

        parts = (rt.split_gather(self.runtime, len(patches), work) if split
                 else [work(range(len(patches)))])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def candidate_windows(method: str, encoder: nn.Module, clustering: Clustering, images: Tensor, indices: np.ndarray,
                      masks: Tensor, window: int, runtime: rt.Runtime,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate windows of the images ``indices`` (cluster activation masking, or Grad-CAM for
    ``method="patchsearch"``), split across ranks: (attention float16 n x S x S, boxes n x 4, eta n)."""
    def work(shard: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        imgs = images[torch.as_tensor(indices[shard.start:shard.stop])]
        if method == "patchsearch":
            att, boxes, eta = gradcam_candidates(encoder, clustering, imgs, window, runtime,
                                                 batch_size=gradcam_batch_size(batch_size))
        else:
            att, boxes, eta = cluster_activation_masking(encoder, clustering, imgs, masks, runtime,
                                                         batch_size=batch_size, window=window)
        return att.numpy().astype(np.float16), boxes.numpy().astype(np.int64), eta.numpy().astype(np.int64)

    parts = rt.split_gather(runtime, len(indices), work)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


SearchHook = Callable[[SearchResult, "np.ndarray | None"], None]


def run_search(settings: SearchSettings, images: Tensor, flip: FlipTest, window: int, image_size: int,
               quiet: bool = True, saved: SearchResult | None = None,
               on_round: SearchHook | None = None) -> SearchResult:
    """The search stage: the iterative search (:func:`iterative_search`) over ``flip.clustering``'s clusters, each
    image scored by its candidate window's poison score on ``flip``. ``saved`` (a killed search's record) keeps the
    scores it holds, so the search repeats its rounds without recomputing them; ``on_round(record, attention)``
    gets the record so far and the attention maps of the images the round scored (``None`` when none were)."""
    masks = make_masks(MaskingConfig(settings.masks, window, settings.mask_strategy, batch_size=flip.batch_size),
                       image_size, torch_gen(flip.seed, "masks"))
    entries: dict[int, ScoredImage] = {e.index: e for e in (saved.scored if saved else [])}
    labels = flip.clustering.labels
    state: dict[str, Any] = {"rounds_done": 0, "pending": None}

    def score_fn(indices: np.ndarray) -> np.ndarray:
        rnd = state["rounds_done"] + 1
        att, boxes, eta = candidate_windows(settings.method, flip.encoder, flip.clustering, images, indices, masks,
                                            window, flip.runtime, flip.batch_size)
        patches = cut_windows(images[torch.as_tensor(indices)], torch.as_tensor(boxes))
        scores = flip.scores(patches, labels[indices], "round", rnd)
        for j, i in enumerate(indices):
            entries[int(i)] = ScoredImage(int(i), int(scores[j]), [int(v) for v in boxes[j]], int(eta[j]),
                                          int(labels[i]), rnd)
        state["pending"] = att
        return scores

    def record(rounds: SearchRounds, completed: bool) -> SearchResult:
        return SearchResult(
            completed=completed, method=settings.method, window=int(window), n_masks=settings.masks,
            mask_strategy=settings.mask_strategy, rule=settings.score_rule, aggregate=settings.aggregate,
            flip_set=[int(i) for i in flip.index],
            rounds=[{k: r[k] for k in ("round", "live_clusters", "scored", "retired", "dropped") if k in r}
                    for r in rounds.rounds],
            scored=[entries[i] for i in rounds.order],
            cluster_scores=[[int(c), float(s)] for c, s in sorted(rounds.cluster_scores.items())])

    def round_done(rounds: SearchRounds) -> None:
        state["rounds_done"] = rnd = len(rounds.rounds)
        pending, state["pending"] = state["pending"], None
        bar.update(info=f"round {rnd}: {rounds.rounds[-1]['live_clusters']} live clusters, "
                        f"{len(rounds.order)} scored")
        bar.advance(rounds.rounds[-1]["scored"])
        if on_round is not None:
            on_round(record(rounds, completed=False), pending)

    with rt.progress("search", total=None, quiet=quiet) as bar:
        rounds = iterative_search(labels, score_fn, settings.samples_per_cluster, settings.drop_fraction,
                                  np.random.default_rng(derive_seed(flip.seed, "search")),
                                  already_scored={i: e.poison_score for i, e in entries.items()},
                                  on_round=round_done, aggregate=settings.aggregate)
    return record(rounds, completed=True)
