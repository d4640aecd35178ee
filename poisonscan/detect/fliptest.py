"""The flip test (PoisonCAM IV-C): the fixed flip test set, pasting a candidate window at random positions on it,
and the poison score, the number of flip-set images the window moves (:class:`FlipTest` scores windows for the
search, evidence and verify stages alike, split across ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poisonscan import runtime as rt
from poisonscan.detect.bounds import estimate, hypergeom_upper, stage_sizes
from poisonscan.detect.clustering import ASSIGN_CHUNK, Clustering
from poisonscan.detect.features import encode, eval_mode, prepare_encoder
from poisonscan.detect.seeds import torch_gen
from poisonscan.settings import PAPER

RULES = ("changed", "to_source")

def torch_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


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


# -- the flip test -------------------------------------------------------------------------------------------------


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

    def order(self) -> Tensor:
        """The fixed random order in which the adaptive stages test the flip set (drawn from ``(seed, "flip order")``),
        so the first ``n`` images are a sample without replacement of the whole set."""
        return torch.randperm(len(self.images), generator=torch_gen(self.seed, "flip order"))

    def staged_scores(self, patches: Tensor, sources: np.ndarray | None, threshold: Threshold, delta: float,
                      *tags: Any, split: bool = True) -> StagedScores:
        """Adaptive poison scores: every window is tested on a first slice of the flip set (:meth:`order`), and
        after each stage (detect/bounds.py, ``STAGES``) only the windows whose upper bound on the full score
        (:func:`~poisonscan.detect.bounds.hypergeom_upper` at ``delta``) still reaches ``threshold(hits, tested)``
        go on. ``threshold`` gets every window's hits so far (hard lower bounds of their full scores) and how many
        flip-set images each was tested on. A window tested on the whole set has exactly the score :meth:`scores`
        gives it (same positions, same pairs); the others are reported scaled (:func:`~poisonscan.detect.bounds.
        estimate`). ``resume``-safe: the same inputs give the same result."""
        n, f = len(patches), len(self.images)
        positions = draw_positions(n, f, torch_gen(self.seed, "paste", *tags))
        order = self.order()
        hits = np.zeros(n, np.int64)
        tested = np.zeros(n, np.int64)
        active = np.arange(n)
        done = 0
        for size in stage_sizes(f):
            cols = order[done:size]
            if active.size:
                hits[active] += self._score_on(patches, sources, positions, active, cols, split)
                tested[active] = size
            done = size
            if size >= f:
                break
            bound = hypergeom_upper(hits[active], size, f, delta)
            active = active[bound >= threshold(hits, tested)]
        return StagedScores(estimate(hits, tested, f), hits, tested)

    def complete(self, staged: StagedScores, patches: Tensor, sources: np.ndarray | None, *tags: Any,
                 split: bool = True) -> StagedScores:
        """Test the windows ``staged`` stopped early (same ``tags``) on the rest of the flip set: every score
        exact, with no flip-set image tested twice."""
        f = len(self.images)
        positions = draw_positions(len(patches), f, torch_gen(self.seed, "paste", *tags))
        order = self.order()
        hits, tested = staged.hits.copy(), staged.tested.copy()
        for t in np.unique(tested[tested < f]):
            idx = np.flatnonzero(tested == t)
            hits[idx] += self._score_on(patches, sources, positions, idx, order[int(t):], split)
            tested[idx] = f
        return StagedScores(hits.copy(), hits, tested)

    def _score_on(self, patches: Tensor, sources: np.ndarray | None, positions: Tensor, active: np.ndarray,
                  cols: Tensor, split: bool) -> np.ndarray:
        """Hits of the windows ``active`` on the flip-set images ``cols`` (their positions fixed up front)."""
        idx = torch.as_tensor(active)
        sub_pos = positions[idx][:, cols]
        sub_patches = patches[idx]
        sub_sources = sources[active] if self.rule == "to_source" else None

        def work(shard: range) -> np.ndarray:
            sl = slice(shard.start, shard.stop)
            return poison_scores(self.encoder, self.clustering, self.images[cols], self.labels[cols],
                                 sub_patches[sl], self.runtime, None, batch_size=self.batch_size, rule=self.rule,
                                 source_clusters=sub_sources[sl] if sub_sources is not None else None,
                                 positions=sub_pos[sl], quiet=True)

        parts = rt.split_gather(self.runtime, len(active), work) if split else [work(range(len(active)))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


#: ``threshold(hits, tested)``: the full score a window must still be able to reach to go on being tested
Threshold = Callable[[np.ndarray, np.ndarray], float]


@dataclass
class StagedScores:
    """Adaptive flip-test results, one entry per window: the reported ``scores`` (exact where ``tested`` is the
    whole flip set, scaled estimates elsewhere), the ``hits`` seen and how many flip-set images each was ``tested``
    on."""

    scores: np.ndarray
    hits: np.ndarray
    tested: np.ndarray
