"""Are the images that hold a held picture copies of the photograph its window was cut from?

    python -m benchmarks.studies.held_copies RUN_DIR TRUTH_CSV [RUN_DIR TRUTH_CSV ...] [--json OUT]

A picture held by a few images passes the held-picture test (detect/holders.py) whether it is a pasted trigger or
part of one photograph the data set holds several copies of. For each run (TRUTH_CSV ``-`` for clean data) whose
evidence record has a held group, it cuts each group window again from the run's search record, finds the images
above the group's bar (:func:`~poisonscan.detect.holders.window_matches`, the window's own image left out) and
compares them with the window's image as whole images (shrunk to 16 px, each centred over all its pixels, cosine):
the holders' median likeness against every image's, and the share of holders among the image's closest 1%. Copies
of one photograph sit in that 1%; images that share only a pasted patch do not. No threat-model forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonscan.data.store import open_store
from poisonscan.detect.holders import window_matches
from poisonscan.detect.masking import cut_windows
from poisonscan.runtime import setup_runtime

from benchmarks.studies.feature_recurrence import poisons_of, study_runs

THUMB = 16          # the side whole images are compared at
CLOSEST = 0.01      # the share of the data set that counts as an image's closest


def thumbnails(images_u8: torch.Tensor, side: int = THUMB, batch: int = 4096) -> torch.Tensor:
    """Every image shrunk to ``side`` px, flattened, centred and of unit norm (N x 3 side^2)."""
    out = []
    for start in range(0, len(images_u8), batch):
        x = F.interpolate(images_u8[start:start + batch].float() / 255.0, size=(side, side), mode="area").flatten(1)
        x = x - x.mean(1, keepdim=True)
        out.append(x / x.norm(dim=1, keepdim=True).clamp_min(1e-6))
    return torch.cat(out)


def study(run: Path, truth: Path | None, runtime: Any) -> dict[str, Any]:
    """The held group's windows on one run: their holders' whole-image likeness to each window's image."""
    ev = json.loads((run / "evidence.json").read_text())
    held = ev.get("held_recurrence") or {}
    out: dict[str, Any] = {"run": str(run), "held": {k: held.get(k) for k in ("size", "holders", "gap", "p_value")}}
    if not held.get("size"):
        return out
    search = json.loads((run / "search.json").read_text())
    boxes = {int(e["index"]): e["box"] for e in search["scored"]}
    images = open_store(run / "store").images
    members = [int(i) for i in held["members"]]          # image indices (the evidence record's)
    windows = cut_windows(images[torch.as_tensor(members)], torch.as_tensor([boxes[i] for i in members]))
    matches = window_matches(images, windows, runtime, 512).numpy()
    thumbs = thumbnails(images)
    poison = np.array(poisons_of(run, truth, list(range(len(images)))))
    rows = []
    for j, own in enumerate(members):
        holders = np.flatnonzero(matches[:, j] >= held["bar"] - 1e-9)
        holders = holders[holders != own]
        like = (thumbs @ thumbs[own]).numpy()
        like[own] = -np.inf
        closest = float(np.quantile(like[np.isfinite(like)], 1.0 - CLOSEST))
        rows.append({"image": own, "poison": bool(poison[own]), "holders": int(len(holders)),
                     "holder_matches": [round(float(v), 3) for v in np.sort(matches[holders, j])[::-1][:10]],
                     "holders_median_likeness": round(float(np.median(like[holders])), 3),
                     "data_median_likeness": round(float(np.median(like[np.isfinite(like)])), 3),
                     "closest_share_of_holders": round(float(np.mean(like[holders] >= closest)), 3),
                     "poisons_among_holders": int(poison[holders].sum())})
    out["windows"] = rows
    return out


def show(r: dict[str, Any]) -> None:
    """One run's held group and its windows' holders, printed."""
    h = r["held"]
    print(f"{r['run']}: held group {h['size']} windows, {h['holders']} holders")
    for w in r.get("windows", []):
        print(f"  window of image {w['image']}{' (poison)' if w['poison'] else ''}: {w['holders']} holders "
              f"({w['poisons_among_holders']} poisons), likeness median {w['holders_median_likeness']:.3f} "
              f"(every image: {w['data_median_likeness']:.3f}), in its closest 1%: "
              f"{100 * w['closest_share_of_holders']:.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runtime = setup_runtime("cpu")
    study_runs(ap, lambda run, truth: study(run, truth, runtime), show)


if __name__ == "__main__":
    main()
