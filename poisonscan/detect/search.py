"""Poisonous image search (PoisonCAM IV-C): the iterative cluster search, and the search stage (:func:`run_search`)
that scores each searched image's candidate window (detect/masking.py, or detect/gradcam.py for PatchSearch) on the
flip test (detect/fliptest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.detect.clustering import Clustering
from poisonscan.detect.fliptest import RULES, FlipTest
from poisonscan.detect.gradcam import gradcam_batch_size, gradcam_candidates
from poisonscan.detect.bounds import kth_largest
from poisonscan.detect.masking import (EVERY_POSITION, STRATEGIES, CoarseToFine, MaskingConfig,
                                       cluster_activation_masking, coarse_to_fine_masking, cut_windows, make_masks,
                                       token_window)
from poisonscan.detect.records import ScoredImage, SearchResult
from poisonscan.detect.seeds import derive_seed, torch_gen
from poisonscan.settings import PAPER, above, at_least, between, one_of

METHODS = ("poisoncam", "patchsearch")
AGGREGATES = ("sum", "max")
MASKINGS = ("coarse-to-fine", "exact")
FLIP_TESTINGS = ("adaptive", "exact")
VIT_MASKINGS = ("drop-tokens", "zero")


@dataclass
class SearchSettings:
    """The search stage's settings (``[detect.search]``; ``--set search.KEY=VALUE``): how candidate windows are
    found and scored. Defaults are the paper's (section VI) except ``score_rule``, ``masking`` and ``vit_masking``,
    whose comments say where each was chosen and checked."""

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
    #: "coarse-to-fine": a cyclic grid of masks at half the window's stride finds the region, 3 x 3 more masks
    #: refine it (73 masks at w = 60/224 instead of B = 256; full-coverage masks only); "exact": the paper's B
    #: masks on every image. Chosen on the demo's poisons (IoU with the trigger 0.517 against 0.535, catch rate
    #: 0.80 against 0.82) and checked on CIFAR-10 50k at 1% (0.348 / 0.556 against 0.352 / 0.572 in 30% of the
    #: time; benchmarks/results/masking/cifar10-r0.1-e15.json)
    masking: str = field(default="coarse-to-fine", metadata=one_of(MASKINGS))
    #: "adaptive": each window is tested on growing slices of the flip set and stops once it can no longer reach
    #: the top-k of the images scored so far (its score is then an estimate, which the cluster sums use, so the
    #: search may keep other clusters than the exact path: with the paper's rule on the demo it tested 464 of 832
    #: windows in full, saved 27% of the flip forwards and shared 17 of its top 20 with the exact path). "exact":
    #: every window on the whole flip set (paper), the default: at the "to_source" score the top-k sit a few flips
    #: above the rest and adaptive testing stopped no window on five measured settings
    flip_testing: str = field(default="exact", metadata=one_of(FLIP_TESTINGS))
    flip_error: float = field(default=1e-4, metadata=between(0.0, 0.5, lo_open=True))
    #: how a ViT threat model is masked: "drop-tokens" removes the tokens a window covers (the window rounded to
    #: whole tokens, every token position of the grid, or the coarse-to-fine plan on it where that needs fewer
    #: masks); "zero" sets the window's pixels to zero like a CNN's (paper). CNNs are always masked by "zero".
    #: Chosen on the poisons of one MoCo v3 ViT-Tiny (CIFAR-10 shard, trigger_12): catch rate 0.203 against 0.149
    #: for pixel zeroing in 82% of its time. A second ViT (trigger_10) learned no backdoor and localises in no mode
    #: (0.079 against 0.091 in 73% of the time): no check either way (docs/design.md, "Masking a ViT")
    vit_masking: str = field(default="drop-tokens", metadata=one_of(VIT_MASKINGS))


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


# -- the search stage --------------------------------------------------------------------------------------------

def candidate_windows(method: str, encoder: nn.Module, clustering: Clustering, images: Tensor, indices: np.ndarray,
                      masks: Tensor, window: int, runtime: rt.Runtime, batch_size: int = 256,
                      coarse_to_fine: tuple[CoarseToFine, int] | None = None, patch: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate windows of the images ``indices`` (cluster activation masking with the shared ``masks``, or
    coarse-to-fine masking with ``coarse_to_fine = (plan, seed)``, by dropping the tokens of a ViT with patch side
    ``patch`` when it is > 0, or Grad-CAM for ``method="patchsearch"``), split across ranks: (attention float16
    n x S x S, boxes n x 4, eta n)."""
    def work(shard: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        imgs = images[torch.as_tensor(indices[shard.start:shard.stop])]
        if method == "patchsearch":
            att, boxes, eta = gradcam_candidates(encoder, clustering, imgs, window, runtime,
                                                 batch_size=gradcam_batch_size(batch_size))
        elif coarse_to_fine is not None:
            plan, seed = coarse_to_fine
            att, boxes, eta = coarse_to_fine_masking(encoder, clustering, imgs, window, runtime,
                                                     torch.Generator().manual_seed(seed), batch_size, plan,
                                                     patch=patch)
        else:
            att, boxes, eta = cluster_activation_masking(
                encoder, clustering, imgs, masks, runtime, batch_size=batch_size,
                window=token_window(window, patch, int(masks.shape[-1])) if patch else window, patch=patch)
        return att.numpy().astype(np.float16), boxes.numpy().astype(np.int64), eta.numpy().astype(np.int64)

    parts = rt.split_gather(runtime, len(indices), work)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


SearchHook = Callable[[SearchResult, "np.ndarray | None"], None]


def token_patch(settings: SearchSettings, encoder: nn.Module) -> int:
    """The ViT patch side when PoisonCAM masks ``encoder`` by dropping tokens, else 0 (pixels are zeroed)."""
    if settings.method != "poisoncam" or settings.vit_masking != "drop-tokens":
        return 0
    return int(encoder.patch_size) if getattr(encoder, "drops_tokens", False) else 0


def masking_window(settings: SearchSettings, encoder: nn.Module, window: int, image_size: int) -> int:
    """The candidate window's side in pixels: ``window``, or rounded to whole tokens when the search drops a ViT's
    tokens (9 px -> 2 tokens = 8 px with patch 4), so the null, the classifier and the outputs use that side."""
    patch = token_patch(settings, encoder)
    return patch * token_window(window, patch, image_size // patch) if patch else window


def token_plan(settings: SearchSettings, window: int, image_size: int, patch: int) -> CoarseToFine | None:
    """The masks of a search that drops tokens: the coarse-to-fine plan on the token grid where it needs fewer masks
    than the grid has positions (and ``settings.masking`` asks for it), else every position; ``None`` (the B shared
    masks, drawn on the token grid) when that is more than B or the mask strategy is not full coverage."""
    grid = image_size // patch
    win = token_window(window, patch, grid)
    coarse = CoarseToFine()
    plan = (coarse if settings.masking == "coarse-to-fine" and coarse.masks_per_image(win, grid) < grid * grid
            else EVERY_POSITION)
    return plan if settings.mask_strategy == "full" and plan.masks_per_image(win, grid) <= settings.masks else None


def uses_coarse_to_fine(settings: SearchSettings, window: int, image_size: int) -> bool:
    """Coarse-to-fine masking applies to PoisonCAM's full-coverage masks when it needs fewer than the B masks;
    other strategies use all B masks."""
    return (settings.method == "poisoncam" and settings.masking == "coarse-to-fine"
            and settings.mask_strategy == "full"
            and CoarseToFine().masks_per_image(window, image_size) < settings.masks)


def masks_per_image(settings: SearchSettings, window: int, image_size: int, patch: int = 0) -> int:
    """Masked forwards per searched image (1 Grad-CAM pass for PatchSearch; ``patch``: see :func:`token_patch`)."""
    if settings.method == "patchsearch":
        return 1
    if patch:
        grid = image_size // patch
        plan = token_plan(settings, window, image_size, patch)
        return settings.masks if plan is None else plan.masks_per_image(token_window(window, patch, grid), grid)
    if uses_coarse_to_fine(settings, window, image_size):
        return CoarseToFine().masks_per_image(window, image_size)
    return settings.masks


def masking_plan(settings: SearchSettings, flip: FlipTest, window: int, image_size: int
                 ) -> tuple[int, CoarseToFine | None, Tensor]:
    """How the search masks: ``(patch, plan, masks)``: the ViT patch side when tokens are dropped (else 0), the
    coarse-to-fine plan (``None``: the B shared masks), and the shared masks (empty with a plan or for PatchSearch),
    drawn from the run's seed."""
    patch = token_patch(settings, flip.encoder)
    grid = image_size // patch if patch else image_size                 # where masks live: tokens or pixels
    mask_window = token_window(window, patch, grid) if patch else window
    plan = (token_plan(settings, window, image_size, patch) if patch
            else CoarseToFine() if uses_coarse_to_fine(settings, window, image_size) else None)
    masks = (torch.zeros(0, grid, grid, dtype=torch.bool) if plan is not None or settings.method == "patchsearch"
             else make_masks(MaskingConfig(settings.masks, mask_window, settings.mask_strategy,
                                           batch_size=flip.batch_size), grid, torch_gen(flip.seed, "masks")))
    return patch, plan, masks


def search_like_windows(settings: SearchSettings, images: Tensor, flip: FlipTest, window: int, image_size: int,
                        indices: np.ndarray) -> Tensor:
    """The windows the search would cut from the images ``indices`` (its masking, masks and window, the
    coarse grid drawn for this purpose): uint8 n x 3 x w x w. The evidence stage's feature recurrence test
    compares the top-k windows with these."""
    indices = np.asarray(indices, dtype=np.int64)
    patch, plan, masks = masking_plan(settings, flip, window, image_size)
    c2f = (plan, derive_seed(flip.seed, "coarse grid", "search-like")) if plan is not None else None
    _, boxes, _ = candidate_windows(settings.method, flip.encoder, flip.clustering, images, indices, masks, window,
                                    flip.runtime, flip.batch_size, c2f, patch)
    return cut_windows(images[torch.as_tensor(indices)], torch.as_tensor(boxes))


def run_search(settings: SearchSettings, images: Tensor, flip: FlipTest, window: int, image_size: int,
               quiet: bool = True, saved: SearchResult | None = None,
               on_round: SearchHook | None = None, top_k: int = PAPER.top_k) -> SearchResult:
    """The search stage: the iterative search (:func:`iterative_search`) over ``flip.clustering``'s clusters, each
    image scored by its candidate window's poison score on ``flip``. ``saved`` (a killed search's record) keeps the
    scores it holds, so the search repeats its rounds without recomputing them; ``on_round(record, attention)``
    gets the record so far and the attention maps of the images the round scored (``None`` when none were).
    ``top_k``: the poison set the evidence stage takes, which adaptive flip testing tests in full."""
    patch, plan, masks = masking_plan(settings, flip, window, image_size)
    entries: dict[int, ScoredImage] = {e.index: e for e in (saved.scored if saved else [])}
    labels = flip.clustering.labels
    n_flip = len(flip.index)
    state: dict[str, Any] = {"rounds_done": 0, "pending": None}

    def score_fn(indices: np.ndarray) -> np.ndarray:
        rnd = state["rounds_done"] + 1
        c2f = (plan, derive_seed(flip.seed, "coarse grid", rnd)) if plan is not None else None
        att, boxes, eta = candidate_windows(settings.method, flip.encoder, flip.clustering, images, indices, masks,
                                            window, flip.runtime, flip.batch_size, c2f, patch)
        patches = cut_windows(images[torch.as_tensor(indices)], torch.as_tensor(boxes))
        if settings.flip_testing == "adaptive":
            known = np.array([e.poison_score for e in entries.values()
                              if e.flips_tested in (0, n_flip)], dtype=np.int64)

            def reach(hits: np.ndarray, tested: np.ndarray) -> float:   # the top-k's lowest score, from below
                return kth_largest(np.concatenate([known, hits]), top_k)

            staged = flip.staged_scores(patches, labels[indices], reach, settings.flip_error, "round", rnd)
            scores, tested = staged.scores, staged.tested
        else:
            scores = flip.scores(patches, labels[indices], "round", rnd)
            tested = np.full(len(indices), n_flip, np.int64)
        for j, i in enumerate(indices):
            entries[int(i)] = ScoredImage(int(i), int(scores[j]), [int(v) for v in boxes[j]], int(eta[j]),
                                          int(labels[i]), rnd, int(tested[j]))
        state["pending"] = att
        return scores

    def record(rounds: SearchRounds, completed: bool) -> SearchResult:
        return SearchResult(
            completed=completed, method=settings.method, window=int(window), n_masks=settings.masks,
            mask_strategy=settings.mask_strategy, rule=settings.score_rule, aggregate=settings.aggregate,
            masking="coarse-to-fine" if plan is not None and plan is not EVERY_POSITION else "exact",
            masked_by="tokens" if patch else "pixels",
            masks_per_image=masks_per_image(settings, window, image_size, patch), flip_testing=settings.flip_testing,
            flip_error=settings.flip_error if settings.flip_testing == "adaptive" else 0.0,
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
