"""Which similarity and bar let the recurrence test see a trigger changed copy by copy, and not clean windows?

    python -m benchmarks.studies.changed_copies RUN_DIR TRUTH_CSV [RUN_DIR TRUTH_CSV ...] [--json OUT]

(TRUTH_CSV ``-`` for a run on clean data.)

The recurrence test (detect/recurrence.py) calls two windows alike when their similarity (the best normalised
cross-correlation over small shifts) reaches one bar for all: the 99th percentile of the similarities between 256
random windows. Copies of a trigger scaled, turned and recoloured one by one (``poisonscan poison --scale-jitter
--rotation --colour-jitter``) fall under it. Two changes are compared, alone and together, with the same group test
(the largest group of the top-k against the largest groups of k random windows, 1,000 draws): the *aligned*
similarity, the best over turns of up to 30 degrees and scales of 0.8-1.25 as well, each colour channel normalised
on its own; and a *bar per window*, each window's own 99th percentile of similarities to the random windows (a
smooth window, alike to many, gets a high bar; a trigger's copy a low one). The random windows are 256 uniform
windows of the run's images drawn with seed 0. Prints, per finished detect run folder, the recorded tests and the
four variants with how many of each group are poisons. No forward pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonscan.detect.recurrence import FLAT_STD, SHIFT_SHARE, as_compared, group_test, own_bar_test, window_similarity

from benchmarks.studies.feature_recurrence import poisons_of, run_truth_pairs, top_and_random_windows, write_runs

ANGLES = (-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0)
SCALES = (0.8, 0.9, 1.0, 1.12, 1.25)
UPSAMPLE = 2
TESTS = ("pixels_shared_bar", "pixels_own_bar", "aligned_shared_bar", "aligned_own_bar")


def _channel_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``n x C x h x w`` windows' valid pixels as rows, each channel centred and scaled to unit norm on its own
    (a channel flatter than FLAT_STD becomes zero), divided by sqrt(C) so two equal windows give 1."""
    v = x[:, :, valid]                                   # n x C x p
    v = v - v.mean(2, keepdim=True)
    norm = v.norm(dim=2, keepdim=True)
    flat = norm < FLAT_STD * v.shape[2] ** 0.5
    v = torch.where(flat, torch.zeros_like(v), v / norm.clamp_min(1e-12))
    return v.flatten(1) / x.shape[1] ** 0.5


def aligned_similarity(a: torch.Tensor, b: torch.Tensor | None = None, angles: tuple[float, ...] = ANGLES,
                       scales: tuple[float, ...] = SCALES) -> np.ndarray:
    """The largest per-channel normalised cross-correlation of windows ``a`` (n) with ``b`` (m) over the turns and
    scales of ``a`` (about its centre) and shifts of up to a third of the width (n x m)."""
    ta = as_compared(a)
    tb = ta if b is None else as_compared(b)
    ta = F.interpolate(ta, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)
    tb = F.interpolate(tb, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)
    n, c, w, _ = ta.shape
    s = int(w * SHIFT_SHARE)
    best = torch.full((n, tb.shape[0]), -1.0)
    for angle, scale in itertools.product(angles, scales):
        r = np.deg2rad(angle)
        theta = torch.tensor([[np.cos(r) / scale, -np.sin(r) / scale, 0.0],
                              [np.sin(r) / scale, np.cos(r) / scale, 0.0]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, w, w], align_corners=False)
        wa = F.grid_sample(ta, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
        inside = F.grid_sample(torch.ones(1, 1, w, w), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0, 0] > 0.999
        for dy in range(-s, s + 1, UPSAMPLE):
            for dx in range(-s, s + 1, UPSAMPLE):
                h, ww = w - abs(dy), w - abs(dx)
                ya, yb = max(dy, 0), max(-dy, 0)
                xa, xb = max(dx, 0), max(-dx, 0)
                valid = inside[ya:ya + h, xa:xa + ww]
                if int(valid.sum()) < (w * w) // 4:
                    continue
                pa = _channel_rows(wa[:, :, ya:ya + h, xa:xa + ww], valid)
                pb = _channel_rows(tb[:, :, yb:yb + h, xb:xb + ww], valid)
                best = torch.maximum(best, pa @ pb.T)
    sim = best.numpy().astype(np.float64)
    if b is None:
        sim = np.maximum(sim, sim.T)   # the turn of a onto b or of b onto a
    return sim


def study(run: Path, truth: Path | None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    search = json.loads((run / "search.json").read_text())
    ev = json.loads((run / "evidence.json").read_text())
    _, top, tw, nw = top_and_random_windows(run, search, ev, seed)
    t0 = time.perf_counter()
    tests = {}
    for name, sim in (("pixels", window_similarity), ("aligned", aligned_similarity)):
        top_sim = sim(tw)
        ref_sim, cross = sim(nw), sim(tw, nw)
        tests[f"{name}_shared_bar"] = group_test(top_sim, ref_sim, n_boot, seed)
        tests[f"{name}_own_bar"] = own_bar_test(top_sim, cross, ref_sim, n_boot, seed)
    seconds = time.perf_counter() - t0
    poison = poisons_of(run, truth, top)
    recorded = {}
    for key in ("recurrence", "changed_recurrence", "held_recurrence", "feature_recurrence"):
        rec = ev.get(key) or {}
        if rec:
            recorded[key] = {"size": rec.get("size"), "p_value": rec.get("p_value"),
                             "poisons_in_group": int(sum(poison[top.index(m)] for m in rec.get("members", [])
                                                             if m in top))}
    return {"run": str(run), "k": len(top), "poisons_in_top_k": int(sum(poison)), "z": ev.get("z"),
            "recorded": recorded, "seconds": round(seconds, 1),
            **{name: {"size": t["size"], "bar": round(t["bar"], 4), "null_group_p99": t["null_group_p99"],
                      "p_value": t["p_value"], "poisons_in_group": int(sum(poison[m] for m in t["members"]))}
               for name, t in tests.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args, pairs = run_truth_pairs(ap)
    rows = []
    for run, truth in pairs:
        r = study(run, truth)
        rows.append(r)
        rec = "; ".join(f"{k}: group {v['size']} ({v['poisons_in_group']} poisons), p {v['p_value']:.3f}"
                        for k, v in r["recorded"].items())
        al = "; ".join(f"{k}: group {r[k]['size']} ({r[k]['poisons_in_group']}), p {r[k]['p_value']:.3f}"
                       for k in TESTS)
        print(f"{run}: {r['poisons_in_top_k']} poisons in the top {r['k']}; recorded {rec}; {al} "
              f"({r['seconds']} s)", flush=True)
        write_runs(args.json, rows)


if __name__ == "__main__":
    main()
