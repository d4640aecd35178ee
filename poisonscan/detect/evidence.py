"""Is there a backdoor at all? Compare the top-k poison scores with those of random windows (a null test).

On a clean data set or a weak threat model the search still returns k "most poisonous" images; they only mean
something if their candidate windows move the flip test set much more than random windows of the same size do.
The top-k are maxima over ``n_scored`` scored images, so they are compared with the same order statistics of the
null: the median of the top-k of ``n_scored`` draws from the null scores, bootstrapped.

Two numbers come out (``decision.min_evidence``, ``decision.min_effect``): ``z``, how unlikely the top-k are under the
null, and ``effect``, by how much: of the flip-set images the null's top-k leave in their cluster, the share the top-k
move. ``detect`` needs ``z`` and either the effect or one picture recurring among the top-k windows
(detect/recurrence.py, ``decision.max_recurrence_p``): where random windows already move most of the flip set (many
clusters, small images) a real trigger's effect stays small, and the recurring picture is what shows it
(docs/design.md, "The evidence gate").
``z`` alone is not enough: the search spends its rounds on the clusters whose windows flip most, so on a model
trained on clean data it still finds windows a few flips stronger than any random draw, and with a tight null those
few flips give z > 3. The effect is measured against the headroom the null leaves, not the whole
flip set: at 32 px random windows already move up to 80% of it, which caps any excess (benchmarks/results/notebook.md s. 2).

``z`` is the gap between the top-k median and the null's top-k median, in units of the smaller of two spreads
(:func:`evidence_z`): the top-k scores' own spread, and the bootstrap's standard deviation of the null's top-k
median. The bootstrap's spread alone is not enough: random windows cut from poisons sometimes cover the trigger, and
with the top-k of 2,028 draws from 256 null windows decided by the best few, two such windows made the resampled
median jump between about 197 and 130 flips (std 15), which hid a CIFAR-10 backdoor whose top-20 windows were all
the trigger (z = 1.2 on the bootstrap's spread; benchmarks/results/notebook.md s. 2b). A trigger moves
nearly the same flip images whichever poisoned image it is cut from, so its windows bunch together: a gap that is
large against their own spread is evidence however lumpy the null. Over the scans recorded with the paper's score
(``changed``), learned backdoors gave 3.8-36 and scans without one at most 3.3 (the clean-data imagenette-96 model,
which the effect test stops); with the default ``to_source`` score z moves in steps of about 2 and clean-data models
reach 4-5 (docs/results.md), so z never decides alone: the effect or a recurring picture must agree.
The null has 1,024 windows (``null_size``); with 256 the null's top-k median, an estimate of its 99th percentile from
its best few windows, moved so much with the draw that a model trained on clean CIFAR-10 passed both tests in 6% of
redrawn nulls and real backdoors failed in up to 4% (benchmarks/studies/null_noise.py; benchmarks/results/notebook.md s. 2c).
``null_pool="outside-topk-clusters"`` draws the null from images outside the top-k's clusters, which keeps most
poisons out of it; it is not the default, because on a model trained on clean data those clusters hold the most
potent natural windows, and leaving them out lowered the null (imagenette-96: effect 5.7% -> 16%).

Its length is the evidence stage with its gate: the null windows and their bootstrap, the stage that runs the
recurrence and held-picture tests beside it, and the gate's reasons in words, read together because each reason
names what the stage measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poisonscan.detect.bounds import hypergeom_upper, kth_largest
from poisonscan.detect.fliptest import FlipTest, StagedScores, torch_generator
from poisonscan.detect.held_response import held_response_test
from poisonscan.detect.holders import held_picture_test, holder_mask, window_matches
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.records import Evidence, HeldResponse, Recurrence, SearchResult
from poisonscan.detect.recurrence import (HELD_SHARE, REFERENCE_SIZE, SIGNIFICANCE, feature_recurrence_test,
                                          pixel_recurrence_tests, trigger_group)
from poisonscan.detect.search import top_k
from poisonscan.detect.seeds import torch_gen
from poisonscan.settings import PAPER, at_least, between, one_of

_BOOT_CHUNK_ELEMS = 4_000_000
NULL_POOLS = ("all", "outside-topk-clusters")
NULL_TESTINGS = ("adaptive", "exact")


@dataclass
class EvidenceSettings:
    """The evidence stage's settings (``[detect.evidence]``; ``--set evidence.KEY=VALUE``): the top-k and the null
    they are compared with. The gate's thresholds belong to the decision (:class:`DecisionSettings`)."""

    top_k: int = field(default=PAPER.top_k, metadata=at_least(1))     # k, the poison set the search returns
    #: random windows scored as the null; with 256 the null's top-k median moved so much with the draw that a
    #: clean-data CIFAR-10 model passed the gate in 6% of redrawn nulls (benchmarks/studies/null_noise.py)
    null_size: int = field(default=1024, metadata=at_least(1))
    #: where null windows are cut: "all" images, or "outside-topk-clusters" (fewer poisons in the null, but a lower
    #: null on clean data: imagenette-96's clean-data model went from effect 5.7% to 16%)
    null_pool: str = field(default="all", metadata=one_of(NULL_POOLS))
    #: "adaptive": null windows are tested on growing slices of the flip set and stop once they cannot reach the
    #: null's upper tail, which alone sets the bootstrap's top-k medians; the bootstrap then checks that every
    #: resample's top-k come from windows tested in full (else the stopped windows are completed), so ``z``, the
    #: effect and the p-value are those of the exact null but for a chance of at most ``null_error`` per window of
    #: that tail.
    #: "exact": every null window on the whole flip set
    null_testing: str = field(default="adaptive", metadata=one_of(NULL_TESTINGS))
    null_error: float = field(default=1e-4, metadata=between(0.0, 0.5, lo_open=True))
    #: also test whether the top-k windows hold one picture changed copy by copy: two windows alike when their
    #: similarity reaches each one's own 99th percentile against the random windows (detect/recurrence.py,
    #: :func:`~poisonscan.detect.recurrence.changed_copies_test`); no forward pass
    changed_copies: bool = True
    #: also test whether a top-k window's picture is held by many images of the data set, set apart from the others
    #: by a gap in their best matches larger than random windows' pictures show (detect/holders.py): what shows a
    #: trigger whose copies are too few among the top-k to group. One pass of small convolutions over every image;
    #: no forward pass
    held_pictures: bool = True
    #: with a held group, the pairs of the response test (detect/held_response.py): a holder's copy of the picture
    #: against an alike window of an image of its cluster that does not hold it, both on the flip test; what ties a
    #: weakly learned trigger's picture to the threat model where the top-k's few windows cannot. Costs 2 x pairs
    #: windows on the flip set (as many as a quarter of the null's 1,024), wherever a held group forms, also where
    #: z clears the bar without it (there it buys the record's figure only). Chosen for the draw's spread on
    #: tinyimagenet100 at 1% with an 8-epoch model, the run the test was built on: two draws of 64 pairs gave p 0.0068
    #: and 4e-7 (24 of 33 and 31 of 34 decided pairs won). 0: off
    held_response_pairs: int = field(default=128, metadata=at_least(0))
    #: also test whether the top-k windows look alike to the threat model (detect/recurrence.py,
    #: :func:`~poisonscan.detect.recurrence.feature_recurrence_test`): what shows a trigger changed copy by copy.
    #: Costs the search's masking of 256 random images (about 19k forwards at 32 px with coarse-to-fine masking)
    feature_recurrence: bool = True
Z_SCALE = "min-spread"  # how ``z`` is scaled (recorded as ``z_scale``)


def null_pool(labels: np.ndarray, top: np.ndarray | list[int], pool: str = "all") -> np.ndarray | None:
    """The image indices null windows may come from: every image outside the clusters (``labels``) of the top-k
    images ``top`` for ``"outside-topk-clusters"``; ``None`` (all images) for ``"all"``, or when excluding those
    clusters would leave no image."""
    if pool not in NULL_POOLS:
        raise ValueError(f"null pool {pool!r}: choose one of {', '.join(NULL_POOLS)}")
    if pool == "all":
        return None
    labels = np.asarray(labels)
    keep = np.flatnonzero(~np.isin(labels, labels[np.asarray(top, dtype=np.int64)]))
    return keep if keep.size else None


def null_sources(n_images: int, n: int, generator: torch.Generator, pool: np.ndarray | None = None) -> Tensor:
    """``n`` image indices drawn uniformly with replacement from ``pool`` (or from all ``n_images``)."""
    if pool is None:
        return torch.randint(0, n_images, (n,), generator=generator)
    return torch.as_tensor(np.asarray(pool, dtype=np.int64))[torch.randint(0, len(pool), (n,), generator=generator)]


def null_windows(images_u8: Tensor, n: int, window: int, generator: torch.Generator | int,
                 pool: np.ndarray | None = None, sources: Tensor | None = None) -> Tensor:
    """``n`` random ``window x window`` patches (uint8 n x 3 x w x w), each cut at a uniform position fully inside an
    image drawn uniformly (with replacement) from ``images_u8`` (N x 3 x S x S), or from its rows ``pool``.
    ``sources``: those images, already drawn by :func:`null_sources` from the same generator."""
    gen = torch_generator(generator)
    total, _, h, w = images_u8.shape
    if total == 0 or n <= 0:
        return torch.zeros(max(n, 0), 3, window, window, dtype=torch.uint8)
    win = min(int(window), h, w)
    idx = null_sources(total, n, gen, pool) if sources is None else sources
    xs = torch.randint(0, w - win + 1, (n,), generator=gen)
    ys = torch.randint(0, h - win + 1, (n,), generator=gen)
    boxes = torch.stack([xs, ys, torch.full_like(xs, win), torch.full_like(xs, win)], dim=1)
    return cut_windows(images_u8[idx], boxes)


def _bootstrap_draws(n_null: int, n_scored: int, n_boot: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """The bootstrap's resamples, in chunks: ``(first row, indices rows x n_scored)`` into the null."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK_ELEMS // max(1, n_scored))
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        yield start, rng.integers(0, n_null, size=(stop - start, n_scored))


def bootstrap_topk_medians(null_scores: np.ndarray, n_scored: int, k: int, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` medians of the top ``k`` of ``n_scored`` draws (with replacement) from ``null_scores``."""
    null = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    k = max(1, min(int(k), int(n_scored)))
    out = np.empty(n_boot, dtype=np.float64)
    for start, idx in _bootstrap_draws(null.shape[0], n_scored, n_boot, seed):
        top = np.partition(null[idx], n_scored - k, axis=1)[:, n_scored - k:]
        out[start:start + len(idx)] = np.median(top, axis=1)
    return out


def bootstrap_is_exact(scores: np.ndarray, resolved: np.ndarray, ceiling: float, n_scored: int, k: int,
                       n_boot: int, seed: int) -> bool:
    """Do the bootstrap's top-k medians (:func:`bootstrap_topk_medians`, same draws) read only windows tested in
    full? True when every resample holds at least ``k // 2 + 1`` draws of ``resolved`` windows scoring above
    ``ceiling`` (the highest any other window can reach): the median of its top ``k`` is then the same whatever
    the other windows' exact scores are."""
    k = max(1, min(int(k), int(n_scored)))
    need = k // 2 + 1
    above = (np.asarray(resolved, bool) & (np.asarray(scores, np.float64) > ceiling)).astype(np.int32)
    for _, idx in _bootstrap_draws(above.shape[0], n_scored, n_boot, seed):
        if int(above[idx].sum(axis=1).min()) < need:
            return False
    return True


def adaptive_null(flip: FlipTest, patches: Tensor, sources: np.ndarray | None, n_scored: int, k: int,
                  delta: float, n_boot: int = 2000) -> StagedScores:
    """Score the null windows adaptively (:meth:`FlipTest.staged_scores`): a window goes on while its upper bound
    can reach the ``m``-th highest hits of all null windows, ``m`` chosen so that about ``k // 2 + 1`` + 6
    standard deviations of the ``n_scored`` resampled draws land among the top ``m``. If some resample still reads
    a window that stopped early (:func:`bootstrap_is_exact`), the stopped windows are tested on the rest of the flip
    set (:meth:`FlipTest.complete`)."""
    n = len(patches)
    need = max(1, min(k, n_scored)) // 2 + 1
    m = min(n, math.ceil(n * (need + 6 * math.sqrt(need) + 6) / max(1, n_scored)))
    staged = flip.staged_scores(patches, sources, lambda hits, tested: kth_largest(hits, m), delta, "null")
    n_flip = len(flip.index)
    resolved = staged.tested >= n_flip
    stopped = ~resolved
    ceiling = -math.inf         # the highest score a stopped window can have: its bound where it stopped
    for t in np.unique(staged.tested[stopped]):
        at = stopped & (staged.tested == t)
        ceiling = max(ceiling, float(hypergeom_upper(staged.hits[at], int(t), n_flip, delta).max()))
    if bootstrap_is_exact(staged.scores, resolved, ceiling, max(n_scored, k), k, n_boot, flip.seed):
        return staged
    return flip.complete(staged, patches, sources, "null")


def backdoor_evidence(topk_scores: np.ndarray, null_scores: np.ndarray, n_scored: int, n_flip: int,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How far the top-k poison scores stand above what random windows reach when picked the same way.

    Returns ``topk_median`` (observed), ``null_median`` (median of the bootstrap top-k medians), ``z``
    (:func:`evidence_z`), ``z_scale``, ``topk_spread``, ``p_value`` (``(1 + #{boot >= observed}) / (1 + n_boot)``; the
    bootstrap cannot exceed the null's maximum, so it is small whenever the top-k pass the best random windows),
    ``effect`` (:func:`effect_size`: the share of the images the null's top-k leave unmoved that the top-k move),
    ``best_flip_share`` (largest top-k score / ``n_flip``), ``null_size``, plus ``k``, ``n_scored``, ``n_boot``,
    ``boot_mean`` and ``boot_std``.
    """
    topk = np.asarray(topk_scores, dtype=np.float64).reshape(-1)
    null = np.asarray(null_scores, dtype=np.float64).reshape(-1)
    if topk.size == 0:
        raise ValueError("no top-k scores to test")
    if null.size == 0:
        raise ValueError("no null scores: score some random windows first")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    n_draw = max(int(n_scored), topk.size)
    boot = bootstrap_topk_medians(null, n_draw, topk.size, n_boot, seed)
    observed = float(np.median(topk))
    mean, std = float(boot.mean()), float(boot.std())
    null_median = float(np.median(boot))
    return {
        "topk_median": observed,
        "null_median": null_median,
        "z": evidence_z(topk, null_median, std),
        "z_scale": Z_SCALE,
        "topk_spread": topk_spread(topk),
        "p_value": float((1 + int((boot >= observed).sum())) / (1 + n_boot)),
        "effect": effect_size(observed, null_median, n_flip),
        "best_flip_share": float(topk.max() / n_flip) if n_flip > 0 else 0.0,
        "null_size": int(null.size),
        "k": int(topk.size),
        "n_scored": int(n_draw),
        "n_boot": int(n_boot),
        "boot_mean": mean,
        "boot_std": std,
    }


def topk_spread(topk_scores: np.ndarray | list[float]) -> float:
    """The spread of the top-k scores: their interquartile range / 1.349 (a normal's standard deviation)."""
    q25, q75 = np.quantile(np.asarray(topk_scores, dtype=np.float64), [0.25, 0.75])
    return float(q75 - q25) / 1.349


def evidence_z(topk_scores: np.ndarray | list[float], null_median: float, boot_std: float) -> float:
    """``(median of the top-k - null_median) / max(min(topk_spread, boot_std), 0.5)``: the gap in units of the
    smaller of the top-k's own spread and the bootstrap's spread of the null's top-k median (the floor keeps k equal
    scores or a constant null from turning a one-flip gap into a huge z)."""
    top = np.asarray(topk_scores, dtype=np.float64)
    return float((np.median(top) - float(null_median)) / max(min(topk_spread(top), float(boot_std)), 0.5))


def effect_size(topk_median: float, null_median: float, n_flip: int) -> float:
    """``(topk_median - null_median) / (n_flip - null_median)``: of the flip-set images the null's top-k leave in
    their cluster, the share the top-k move (0 when the null already moves them all)."""
    headroom = float(n_flip) - float(null_median)
    return float((float(topk_median) - float(null_median)) / headroom) if headroom > 0 else 0.0


def effect_of(ev: Evidence) -> float:
    """The effect of an evidence record, computed from its fields (``effect`` itself when it has no flip set)."""
    if not ev.n_flip:
        return float(ev.effect)
    return effect_size(ev.topk_median, ev.null_median, int(ev.n_flip))


def by_effect(ev: Evidence, min_evidence: float, min_effect: float) -> bool:
    """Does the record pass the gate on the flip test alone (``z >= min_evidence`` and ``effect >= min_effect``)?
    A signal that does not rests on the recurring picture, which the picture match must then find in some image
    (:func:`~poisonscan.detect.matching.match_verdict`)."""
    return float(ev.z) >= min_evidence and effect_of(ev) >= min_effect


def p_text(p: float) -> str:
    """A p-value in words: ``p = 0.012``, or ``p < 0.001``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def group_text(rec: Recurrence) -> str:
    """The recurrence test's group in words: pixels ("show one picture"), changed copies ("show one picture,
    changed copy by copy") or features ("look alike to the threat model", against the windows the search picks in
    random images)."""
    if rec.signature == "changed":
        return (f"{rec.size} of the top {rec.k} windows show one picture, changed copy by copy (each more alike to "
                f"the others than to 99% of random windows; random windows: groups of up to "
                f"{rec.null_group_p99:g}, p = {rec.p_value:.3f})")
    if rec.signature == "held":
        return (f"the picture of {rec.size} of the top {rec.k} windows is held by {rec.holders} images of the data "
                f"set, set apart from the others by a gap of {rec.gap:.3f} in similarity (random windows' pictures: "
                f"gaps up to {rec.null_group_p99:.3f}, {p_text(rec.p_value)})")
    if rec.signature == "features":
        return (f"{rec.size} of the top {rec.k} windows look alike to the threat model, though not pixel for pixel "
                f"(windows the search picks in random images: groups of up to {rec.null_group_p99:g}, p = "
                f"{rec.p_value:.3f})")
    return (f"{rec.size} of the top {rec.k} windows show one picture (random windows: groups of up to "
            f"{rec.null_group_p99:g}, p = {rec.p_value:.3f})")


def held_response_of(ev: Evidence, group: Recurrence | None) -> HeldResponse | None:
    """The held picture's response test where it speaks for ``group`` (the gate's recurring picture): the held
    group itself, or a group at least :data:`~poisonscan.detect.recurrence.HELD_SHARE` of whose windows it holds;
    else None."""
    held, response = ev.held_recurrence, ev.held_response
    if group is None or held is None or response is None or not held.size:
        return None
    if group is held or len(set(group.members) & set(held.members)) >= HELD_SHARE * max(1, group.size):
        return response
    return None


def response_text(response: HeldResponse) -> str:
    """The response test in words."""
    return (f"copies from {response.pairs} images that hold it against alike windows of images of their clusters: "
            f"{response.wins} moved more of the flip set, {response.losses} fewer, {p_text(response.p_value)}")


def evidence_gate(ev: Evidence, min_evidence: float, min_effect: float, max_recurrence_p: float = SIGNIFICANCE,
                  weak_signal_p: float = SIGNIFICANCE) -> tuple[bool, str]:
    """Is there a backdoor signal, and a one-line reason? Either the flip test alone (:func:`by_effect`), or one
    trigger's copies among the top-k windows (:func:`~poisonscan.detect.recurrence.trigger_group`: the picture
    recurring pixel for pixel, else its copies changed one by one (each window's own bar), else a top-k window's
    picture held by many images of the data set (detect/holders.py; first where it holds most of the changed
    copies' windows), else a group alike in the threat model's features, at ``p <= max_recurrence_p``; 0: the flip
    test alone decides; a record without the tests has no group) whose windows also stand above random ones on the
    flip test: ``z >= min_evidence``, or, for a trigger learned too weakly to reach that ``z``, the bootstrap's
    ``p <= weak_signal_p`` (the top-k median above the top-k medians of random windows picked the same way) or, for
    a held picture, its response test's (:func:`held_response_of`; 0: ``z`` is needed). Either of the two looks at
    that level may pass, so a picture held across the data set is let through at up to twice ``weak_signal_p``. A
    signal that rests on a recurring picture stands only if the picture match finds images that hold it
    (detect/matching.py)."""
    z, effect, p = float(ev.z), effect_of(ev), float(ev.p_value)
    found = trigger_group(ev, max_recurrence_p)
    rec = found or ev.recurrence
    recurring = found is not None
    moved = f"the top-k move {100 * effect:.1f}% of the flip-set images random windows leave in place"
    group = group_text(rec) if rec else ""
    response = held_response_of(ev, found)
    weak = f"though z = {z:.2f} is below the minimum evidence {min_evidence:g} and {moved}: a trigger the " \
           "threat model learned weakly"
    if z < min_evidence and recurring and p <= weak_signal_p:
        return True, (f"backdoor signal: {group}, and their poison scores stand above random windows' (p = "
                      f"{p:.4f}), {weak}")
    if z < min_evidence and recurring and response is not None and 0 < weak_signal_p and \
            response.p_value <= weak_signal_p:
        return True, (f"backdoor signal: {group}, and the threat model responds to it ({response_text(response)}), "
                      f"{weak}")
    if z < min_evidence and recurring:
        also = (f", nor does the threat model respond to it ({response_text(response)})"
                if response is not None and weak_signal_p > 0 else "")
        return False, (f"no backdoor signal: z = {z:.2f} is below the minimum evidence {min_evidence:g}, though "
                       f"{group}: their poison scores do not stand above random windows' (p = {p:.3f}, "
                       f"asked: {weak_signal_p:g}){also}, "
                       f"{'a pattern' if rec.signature == 'features' else 'a picture'} "
                       "the threat model responds to too weakly to call a backdoor, or not at all (--set "
                       "decision.force=true removes the images that hold it)")
    if z < min_evidence:
        return False, (f"no backdoor signal: z = {z:.2f} is below the minimum evidence {min_evidence:g} (the best "
                       "windows the search found move the flip set hardly more than random windows do: the threat "
                       "model responds to no trigger, or learned it too weakly to find)")
    if effect >= min_effect:
        return True, f"backdoor signal: z = {z:.2f}, {moved}" + (f"; {group}" if recurring else "")
    if recurring:
        return True, (f"backdoor signal: z = {z:.2f}, {group}; {moved}, below the minimum effect "
                      f"{100 * min_effect:g}%")
    feat = ev.feature_recurrence
    if rec is None and feat is not None:
        why = (f"and the top-k windows do not look alike to the threat model (largest group {feat.size} of {feat.k}; "
               f"search-like windows: up to {feat.null_group_p99:g}, p = {feat.p_value:.3f})")
    elif rec is None:
        why = "and the record has no recurrence test"
    elif max_recurrence_p <= 0:
        why = "and a recurring picture is not asked for (decision.max_recurrence_p = 0)"
    else:
        why = (f"and no picture recurs among the top-k (largest group {rec.size} of {rec.k}; random windows: "
               f"up to {rec.null_group_p99:g}, p = {rec.p_value:.3f})")
        changed = ev.changed_recurrence
        if changed is not None:
            why += (f" nor as changed copies (each window's own bar: largest group {changed.size}; random windows: "
                    f"up to {changed.null_group_p99:g}, p = {changed.p_value:.3f})")
        held = ev.held_recurrence
        if held is not None:
            why += (f" nor is a window's picture held across the data set (largest gap {held.gap:.3f}; random "
                    f"windows' pictures: up to {held.null_group_p99:.3f}, {p_text(held.p_value)})")
        if feat is not None:
            why += (f" nor do they look alike to the threat model (largest group {feat.size}; search-like windows: "
                    f"up to {feat.null_group_p99:g}, p = {feat.p_value:.3f})")
    return False, (f"no backdoor signal: {moved}, below the minimum effect {100 * min_effect:g}%, {why}: a "
                   "response this small without a recurring picture is what clean data, or a weakly learned trigger, "
                   "gives")


# -- the evidence stage -------------------------------------------------------------------------------------------

def draw_null(images: Tensor, labels: np.ndarray, n: int, pool: np.ndarray | None, window: int, seed: int,
              rule: str) -> tuple[Tensor, Tensor, np.ndarray | None]:
    """The evidence stage's ``n`` random windows, drawn from the run's ``seed``: ``(source images, windows, their
    clusters)`` (the clusters only for the ``to_source`` rule, whose windows are cut one source at a time)."""
    gen = torch_gen(seed, "null")
    src = null_sources(len(images), n, gen, pool)       # the images the null windows are cut from
    if rule == "to_source":  # the null windows need their source image's cluster
        patches = torch.cat([null_windows(images[int(i):int(i) + 1], 1, window, gen) for i in src])
        return src, patches, labels[src.numpy()]
    return src, null_windows(images, n, window, gen, sources=src), None


def run_evidence(settings: EvidenceSettings, search: SearchResult, images: Tensor, flip: FlipTest,
                 window: int, search_like: Callable[[np.ndarray], Tensor] | None = None, quiet: bool = True
                 ) -> Evidence:
    """The evidence stage: score ``settings.null_size`` random windows on the flip test like candidates, compare the
    search's top-k with them (:func:`backdoor_evidence`), test whether one picture recurs among the top-k windows
    against the same random windows (detect/recurrence.py; no forward pass) and, with
    ``settings.feature_recurrence`` and ``search_like`` (the windows the search picks in the given images), whether
    the top-k windows look alike to the threat model against the search-like windows of the first 256 null
    images; with ``settings.held_pictures``, whether a top-k window's picture is held across the data set
    (detect/holders.py, against the same 256 random windows) and, where it is, whether the threat model responds
    to it (detect/held_response.py, ``settings.held_response_pairs``)."""
    scores = search.scores
    top = top_k(scores, settings.top_k)
    labels = flip.clustering.labels
    pool = null_pool(labels, top, settings.null_pool)   # None: all images
    src, patches, sources = draw_null(images, labels, settings.null_size, pool, window, flip.seed, flip.rule)
    n_flip = len(flip.index)
    if settings.null_testing == "adaptive":
        staged = adaptive_null(flip, patches, sources, len(scores), len(top), settings.null_error)
        null, null_tested = staged.scores, staged.tested.tolist()
    else:
        null, null_tested = flip.scores(patches, sources, "null"), []
    ev = backdoor_evidence(np.array([scores[i] for i in top]), null, len(scores), n_flip, seed=flip.seed)
    boxes = search.boxes
    top_windows = cut_windows(images[torch.as_tensor(top, dtype=torch.int64)],
                              torch.as_tensor([boxes[i] for i in top], dtype=torch.int64).reshape(-1, 4))
    rec, changed = pixel_recurrence_tests(top_windows, patches, seed=flip.seed, changed=settings.changed_copies)
    held = response = None
    if settings.held_pictures:
        ref = min(REFERENCE_SIZE, len(patches))
        matches = window_matches(images, torch.cat([top_windows, patches[:ref]]), flip.runtime, flip.batch_size,
                                 quiet, "held pictures", split=True)
        held = {"signature": "held", **held_picture_test(matches.numpy(), [int(i) for i in top], src[:ref].tolist())}
        if held["size"] and settings.held_response_pairs > 0:
            members = held["members"]
            own = matches[:, members].numpy()             # every image's best matches to the group's windows
            response = held_response_test(flip, images, top_windows[torch.as_tensor(members)],
                                          holder_mask(own, list(range(len(members))), held["bar"],
                                                      [int(top[j]) for j in members]),
                                          own.max(axis=1), [int(i) for i in top], settings.held_response_pairs)
    for group in (rec, changed, held):
        if group is not None:
            group["members"] = [int(top[j]) for j in group["members"]]      # image indices
    feat = None
    if settings.feature_recurrence and search_like is not None:
        reference = search_like(src[:REFERENCE_SIZE].numpy())
        feat = feature_recurrence_test(flip.encoder, top_windows, reference, int(images.shape[-1]), flip.runtime,
                                       seed=flip.seed, batch_size=flip.batch_size)
        feat["members"] = [int(top[j]) for j in feat["members"]]
    excluded = sorted({int(c) for c in labels[np.asarray(top, dtype=np.int64)]}) if pool is not None else []
    return Evidence.from_json({
        **ev, "recurrence": rec, "changed_recurrence": changed, "held_recurrence": held, "held_response": response,
        "feature_recurrence": feat,
        "top_k": top,
        "topk_scores": [scores[i] for i in top], "null_scores": null.tolist(),
        "null_testing": settings.null_testing, "null_tested": null_tested, "n_flip": n_flip,
        "null_sources": src.tolist(),
        "null_pool": settings.null_pool if pool is not None else "all",
        "null_pool_size": len(pool) if pool is not None else len(images), "null_excluded_clusters": excluded})
