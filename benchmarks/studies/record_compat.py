"""Reading the evidence records of older detect runs kept in ``benchmarks/results/`` in today's terms.

The package reads only run folders written by its own version; the studies that tabulate recorded runs use these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from poisonscan.detect.evidence import Z_SCALE, effect_of, evidence_z, null_pool, null_sources, topk_spread
from poisonscan.detect.records import Evidence
from poisonscan.detect.fliptest import torch_generator


def replay_null_sources(generator: torch.Generator | int, n_images: int, n: int, labels: np.ndarray,
                        top: np.ndarray | list[int], pool: str = "all") -> np.ndarray:
    """The images an evidence test's ``n`` null windows were cut from, for a record that does not list them: the
    first draw of its generator (detect seeds it with ``derive_seed(seed, "null")``), replayed."""
    return null_sources(n_images, n, torch_generator(generator), null_pool(labels, top, pool)).numpy()


def needs_rescale(ev: dict[str, Any]) -> bool:
    """Was ``z`` written with another scale than today's, and does the record keep what today's needs?"""
    return ev.get("z_scale") != Z_SCALE and bool(ev.get("topk_scores")) and "null_median" in ev and "boot_std" in ev


def upgrade_record(ev: dict[str, Any]) -> dict[str, Any]:
    """An evidence record in today's terms: ``effect`` added, and ``z`` recomputed (:func:`evidence_z`) from the
    record's top-k scores, null median and bootstrap std when it was scaled otherwise (a summary without them keeps
    its ``z``)."""
    ev = dict(ev)
    if needs_rescale(ev):
        scores = ev["topk_scores"]
        ev.update(z=evidence_z(scores, ev["null_median"], ev["boot_std"]), z_scale=Z_SCALE,
                  topk_spread=topk_spread(scores))
    ev["effect"] = effect_of(Evidence.from_json(ev))
    return ev
