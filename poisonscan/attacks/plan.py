"""Which images of a data set get the trigger, and where: the per-target poison counts and the seeded plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from poisonscan.attacks.patch import IDENTITY, Transform, corner_range, draw_transform, trigger_side
from poisonscan.attacks.targets import Target
from poisonscan.config import PoisonConfig
from poisonscan.data.sources import SampleError, Source
from poisonscan.errors import UsageError
from poisonscan.runtime import progress

Box = tuple[int, int, int, int]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def poison_counts(cfg: PoisonConfig, source: Source, targets: list[Target]) -> list[int]:
    """How many images of its class each target poisons."""
    sizes = [sum(1 for lab in source.labels if lab == t.label) for t in targets]
    if cfg.dataset_rate is not None:
        total = max(len(targets), _round_half_up(cfg.dataset_rate * len(source)))
        base, extra = divmod(total, len(targets))
        counts = [base + (1 if k < extra else 0) for k in range(len(targets))]
    else:
        counts = [max(1, _round_half_up(float(cfg.rate) * n)) for n in sizes]
    for t, size in zip(targets, sizes):
        if size == 0:
            raise UsageError(f"class {t.cls!r} has no images in {cfg.data}")
    demand: dict[int, int] = {}
    for t, n in zip(targets, counts):
        demand[t.label] = demand.get(t.label, 0) + n
    for t, size in zip(targets, sizes):
        if demand[t.label] > size:
            raise UsageError(f"{demand[t.label]} poisoned images are needed from class {t.cls!r}, which has only "
                             f"{size}: lower --rate/--dataset-rate")
    return counts


@dataclass
class Plan:
    """The poisoned training samples: index -> (target, box), how each copy of its trigger is changed
    (``transforms``; absent: pasted as the file is) and the images left out because unreadable."""

    poisoned: dict[int, tuple[Target, Box]]
    unreadable: list[SampleError]
    transforms: dict[int, Transform] = field(default_factory=dict)


def jitters(cfg: PoisonConfig) -> bool:
    """Whether the patch attack changes its trigger copy by copy (``--scale-jitter``, ``--rotation``,
    ``--colour-jitter``)."""
    return cfg.attack == "patch" and bool(cfg.scale_jitter or cfg.rotation or cfg.colour_jitter)


def next_transform(cfg: PoisonConfig, rng: np.random.Generator) -> Transform:
    """The next copy's :class:`Transform` from ``rng`` (:data:`IDENTITY`, drawing nothing, without jitter)."""
    if not jitters(cfg):
        return IDENTITY
    return draw_transform(rng, cfg.scale_jitter, cfg.rotation, cfg.colour_jitter)


def image_box(cfg: PoisonConfig, rng: np.random.Generator, w: int, h: int, margin: float, sample_id: str,
              scale: float = 1.0) -> Box:
    """The trigger box on a ``w x h`` image: a random corner for patch, the whole image for blend/ctrl. ``scale``
    multiplies the trigger's side (a jittered copy); a side scaled up past the margins is cut back to fit them,
    never below the unscaled side."""
    if cfg.attack != "patch":
        return 0, 0, w, h
    base = trigger_side(cfg.trigger_size, w, h)
    size = max(1, int(round(base * scale)))
    if size > base:
        fit = min(int((1.0 - margin) * w) - int(margin * w), int((1.0 - margin) * h) - int(margin * h))
        size = max(base, min(size, fit))
    if size > min(w, h):
        raise UsageError(f"trigger of {size} px is larger than image {sample_id} ({w}x{h}): lower --trigger-size")
    try:
        x_lo, x_hi = corner_range(w, size, margin)
        y_lo, y_hi = corner_range(h, size, margin)
    except ValueError:
        raise UsageError(f"trigger of {size} px does not fit between margins {margin:g} of image {sample_id} "
                         f"({w}x{h}): lower --trigger-size or the margin") from None
    x, y = rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1))
    return int(x), int(y), size, size


def plan_poisons(cfg: PoisonConfig, source: Source, targets: list[Target], counts: list[int], quiet: bool) -> Plan:
    """Pick the poisoned images of each target class (unreadable ones are replaced) and draw their boxes."""
    select_rng = np.random.default_rng([cfg.seed, 0])
    box_rng = np.random.default_rng([cfg.seed, 1])
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(source.labels):
        if lab is not None:
            by_class.setdefault(lab, []).append(i)
    taken: set[int] = set()
    chosen: dict[int, Target] = {}
    sizes: dict[int, tuple[int, int]] = {}
    unreadable: list[SampleError] = []
    with progress("poison: choose", total=sum(counts), quiet=quiet) as bar:
        for t, n in zip(targets, counts):
            pool = [i for i in by_class.get(t.label, []) if i not in taken]
            order = [pool[j] for j in select_rng.permutation(len(pool))]
            got = 0
            while got < n and order:
                batch, order = order[: n - got], order[n - got:]
                for i, item in source.iter_indexed(sorted(batch)):
                    taken.add(i)
                    if isinstance(item, SampleError):
                        unreadable.append(item)
                        continue
                    chosen[i] = t
                    sizes[i] = item.image.size
                    got += 1
                    bar.advance()
            if got < n:
                raise UsageError(f"class {t.cls!r} has only {got} readable images left, {n} needed "
                                 f"({len(unreadable)} unreadable): lower --rate/--dataset-rate")
    jitter_rng = np.random.default_rng([cfg.seed, 3])          # its own stream: the choice and corners ignore it
    transforms = {i: next_transform(cfg, jitter_rng) for i in sorted(chosen)} if jitters(cfg) else {}
    poisoned = {i: (chosen[i], image_box(cfg, box_rng, *sizes[i], cfg.margin, source.ids[i],
                                         transforms[i].scale if transforms else 1.0)) for i in sorted(chosen)}
    return Plan(poisoned, unreadable, transforms)


# --------------------------------------------------------------------------------------------------------------------
# applying an attack
