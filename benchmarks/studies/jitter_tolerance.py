"""How much may each copy of a trigger change before the recurrence test stops seeing one picture?

    python -m benchmarks.studies.jitter_tolerance DATA TRIGGER --target CLASS --work DIR [--json OUT]

For each setting of ``poisonscan poison``'s copy-by-copy changes (scale, turn, colour; one at a time, then all
three), the labelled data set ``DATA`` is poisoned (the cifar10 preset's 8-px trigger and margins), the window the
search would cut around each copy (the detect window, 60/224 of the side, centred on the copy's ground-truth box) is
taken from the first ``--copies`` poisons, and the recurrence test's similarity (detect/recurrence.py) is computed
between the copies and between 256 random windows of clean images: the bar (the random pairs' 99th percentile), the
share of copy pairs that reach it and the largest group of 20 copies, beside the 99th percentile of the largest
groups of 20 random windows (1,000 draws). No threat model is needed: this is what the pixel test can see at best,
with windows that sit exactly on the copies. With ``--turns`` and ``--scales`` the copies and the random windows are
also compared with the second window turned and scaled by each of those amounts (the best over all of them,
:func:`tolerant_similarity`): whether a similarity that forgives the attacker's changes groups more copies than it
lets random windows group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonscan.attacks.poison import poison_dataset
from poisonscan.attacks.presets import get_preset
from poisonscan.config import PoisonConfig
from poisonscan.data.sources import open_source
from poisonscan.detect.recurrence import REFERENCE_SIZE, as_compared, group_test, window_similarity
from poisonscan.eval.detection import read_truth
from poisonscan.settings import PAPER

#: the cifar10 preset's trigger side in pixels
TRIGGER_SIZE = float(get_preset("cifar10").values["trigger_size"])
#: (name, scale_jitter, rotation, colour_jitter)
SETTINGS = [("unchanged", 0.0, 0.0, 0.0), ("colour 0.3", 0.0, 0.0, 0.3), ("scale 0.1", 0.1, 0.0, 0.0),
            ("scale 0.25", 0.25, 0.0, 0.0), ("turn 10", 0.0, 10.0, 0.0), ("turn 20", 0.0, 20.0, 0.0),
            ("turn 30", 0.0, 30.0, 0.0), ("all three", 0.25, 30.0, 0.3)]


def windows(data: Path, copies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The detect-sized windows centred on the first ``copies`` poisons, and 256 random windows of clean images."""
    gt = read_truth(data / "ground_truth.csv")
    src = open_source(data / "train")
    poisons = np.flatnonzero(gt.poisoned)[:copies].tolist()
    rng = np.random.default_rng(seed)
    clean = sorted(rng.choice(np.flatnonzero(~gt.poisoned), REFERENCE_SIZE, replace=False).tolist())
    wanted = sorted(set(poisons) | set(clean))
    images = {i: np.asarray(item.image.convert("RGB")) for i, item in src.iter_indexed(wanted)}
    side = images[poisons[0]].shape[0]
    w = max(1, round(PAPER.window / PAPER.reference_size * side))
    cut = []
    for i in poisons:
        x, y, s, _ = (int(v) for v in gt.boxes[i])
        cx = min(max(x + s // 2 - w // 2, 0), side - w)
        cy = min(max(y + s // 2 - w // 2, 0), side - w)
        cut.append(images[i][cy:cy + w, cx:cx + w].transpose(2, 0, 1))
    ref = []
    for i in clean:
        x, y = rng.integers(0, side - w + 1, 2)
        ref.append(images[i][y:y + w, x:x + w].transpose(2, 0, 1))
    return np.stack(cut), np.stack(ref)


def turned(windows: np.ndarray, degrees: float, scale: float) -> torch.Tensor:
    """``windows`` as the recurrence test compares them, turned by ``degrees`` and scaled by ``scale`` about their
    centre (bilinear); the corners the turn uncovers take each window's channel means, which centring ignores."""
    t = as_compared(windows)
    mean = t.mean((2, 3), keepdim=True)
    a = np.deg2rad(degrees)
    m = torch.tensor([[np.cos(a) / scale, -np.sin(a) / scale, 0.0], [np.sin(a) / scale, np.cos(a) / scale, 0.0]],
                     dtype=torch.float32)
    grid = F.affine_grid(m.expand(len(t), 2, 3), list(t.shape), align_corners=False)
    return F.grid_sample(t - mean, grid, align_corners=False) + mean


def tolerant_similarity(windows: np.ndarray, turns: tuple[float, ...] = (), scales: tuple[float, ...] = ()
                        ) -> np.ndarray:
    """:func:`window_similarity` of every pair, the best over the second window unchanged, turned by +- each of
    ``turns`` degrees and scaled by each of ``scales`` (and both), made symmetric."""
    sim = window_similarity(windows)
    for deg in (0.0, *turns, *(-d for d in turns)):
        for scale in (1.0, *scales):
            if deg or scale != 1.0:
                sim = np.maximum(sim, window_similarity(windows, turned(windows, deg, scale)))
    return np.maximum(sim, sim.T)


def measure(copies: np.ndarray, ref: np.ndarray, k: int = 20, turns: tuple[float, ...] = (),
            scales: tuple[float, ...] = ()) -> dict[str, Any]:
    sim = tolerant_similarity(copies, turns, scales)
    test = group_test(sim[:k, :k], tolerant_similarity(ref, turns, scales))
    pairs = sim[np.triu_indices(len(copies), 1)]
    return {"bar": test["bar"], "pair_median": float(np.median(pairs)),
            "share_alike": float((pairs >= test["bar"] - 1e-9).mean()), "group_of_20": test["size"],
            "random_group_p99": test["null_group_p99"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("trigger")
    ap.add_argument("--target", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--turns", default="", help="degrees, comma-separated (e.g. 15,30)")
    ap.add_argument("--scales", default="", help="factors, comma-separated (e.g. 0.8,1.25)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    turns = tuple(float(v) for v in args.turns.split(",") if v)
    scales = tuple(float(v) for v in args.scales.split(",") if v)
    rows = []
    for name, scale, turn, colour in SETTINGS:
        out = args.work / name.replace(" ", "-")
        if not (out / "summary.json").exists():
            poison_dataset(PoisonConfig(data=args.data, out=str(out), targets=[f"{args.target}={args.trigger}"],
                                        rate=0.5, trigger_size=TRIGGER_SIZE,
                                        scale_jitter=scale, rotation=turn, colour_jitter=colour), quiet=True)
        m = measure(*windows(out, args.copies), turns=turns, scales=scales)
        rows.append({"setting": name, "scale_jitter": scale, "rotation": turn, "colour_jitter": colour, **m})
        print(f"{name:<12} bar {m['bar']:.3f}  copies' median {m['pair_median']:.3f}  alike {m['share_alike']:.2f}"
              f"  largest group of 20: {m['group_of_20']} (random windows: {m['random_group_p99']:g})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"data": args.data, "trigger": args.trigger, "target": args.target,
                                         "turns": list(turns), "scales": list(scales), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
