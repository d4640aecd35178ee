"""The held-picture test on finished detect runs: is a top-k window's picture held by many images of the data set?

    python -m benchmarks.studies.held_pictures RUN_DIR TRUTH_CSV [RUN_DIR TRUTH_CSV ...] [--json OUT]

For each run (TRUTH_CSV ``-`` for clean data) it draws the evidence stage's random windows again from the run's seed
(:func:`~poisonscan.detect.evidence.draw_null`), scans every image for the top-k windows and the first 256 random
windows (:func:`~poisonscan.detect.holders.window_matches`) and runs
:func:`~poisonscan.detect.holders.held_picture_test`; then the picture match with the group's windows and bar
(:func:`~poisonscan.detect.matching.find_picture`), as the match stage would. It prints each top-k window's largest
gap (``P``: a poison's window), the random windows' largest gaps, the test and, with a ground truth, the images that
hold the picture against the poisons. No threat-model forward: it answers what the test would decide on runs whose
threat models are already trained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonscan.data.store import open_store
from poisonscan.detect.evidence import draw_null, null_pool
from poisonscan.detect.holders import held_picture_test, largest_gap, window_matches
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.matching import find_picture
from poisonscan.detect.recurrence import REFERENCE_SIZE
from poisonscan.runtime import setup_runtime

from benchmarks.studies.feature_recurrence import poisons_of, study_runs


def study(run: Path, truth: Path | None, runtime: Any) -> dict[str, Any]:
    """The held-picture test on one run folder, with the poisons among the top-k and the holders."""
    cfg = json.loads((run / "config.json").read_text())
    search = json.loads((run / "search.json").read_text())
    ev = json.loads((run / "evidence.json").read_text())
    images = open_store(run / "store").images
    labels = np.load(run / "clusters.npz")["labels"]
    top = [int(i) for i in ev["top_k"]]
    boxes = {int(e["index"]): e["box"] for e in search["scored"]}
    window = int(search["window"])
    t0 = time.perf_counter()
    pool = null_pool(labels, top, cfg["evidence"].get("null_pool", "all"))
    src, patches, _ = draw_null(images, labels, int(cfg["evidence"]["null_size"]), pool, window, int(cfg["seed"]),
                                cfg["search"].get("score_rule", "to_source"))
    top_windows = cut_windows(images[torch.as_tensor(top)], torch.as_tensor([boxes[i] for i in top]))
    ref = min(REFERENCE_SIZE, len(patches))
    matches = window_matches(images, torch.cat([top_windows, patches[:ref]]), runtime, 512).numpy()
    held = held_picture_test(matches, top, src[:ref].tolist())
    seconds = time.perf_counter() - t0
    poison = np.array(poisons_of(run, truth, list(range(len(images)))))
    gaps = [largest_gap(matches[:, j], own) for j, own in enumerate(top)]
    ref_gaps = sorted((largest_gap(matches[:, len(top) + j], int(src[j]))[1] for j in range(ref)), reverse=True)
    out: dict[str, Any] = {
        "run": str(run), "images": len(images), "poisons": int(poison.sum()), "seconds": round(seconds, 1),
        "top_k": [{"poison": bool(poison[i]), "holders": g[0], "gap": round(g[1], 4),
                   "poisons_above": int(poison[np.flatnonzero(matches[:, j] >= (g[2] + g[3]) / 2)].sum())}
                  for j, (i, g) in enumerate(zip(top, gaps))],
        "random_gaps_top5": [round(g, 4) for g in ref_gaps[:5]],
        "random_gaps": [round(g, 5) for g in ref_gaps],
        "test": {k: v for k, v in held.items() if k != "members"},
    }
    if held["size"]:
        members = [top[j] for j in held["members"]]
        pm, match = find_picture(images, top_windows[torch.as_tensor(held["members"])], held["bar"], runtime,
                                 group=members)
        holds = match >= pm.threshold - 1e-9
        out["match"] = {"threshold": round(pm.threshold, 4), "outlier_bar": round(pm.outlier_bar, 4),
                        "holders": int(holds.sum()), "poisons_holding": int((holds & poison).sum())}
    return out


def show(r: dict[str, Any]) -> None:
    """One run's top-k gaps, random windows' gaps, test and match, printed."""
    t = r["test"]
    print(f"{r['run']}: {r['images']:,} images, {r['poisons']} poisons ({r['seconds']} s)")
    print("  top-k gaps:", " ".join(f"{w['gap']:.3f}{'P' if w['poison'] else ''}" for w in r["top_k"]))
    print(f"  random windows' largest gaps: {r['random_gaps_top5']}")
    print(f"  test: largest gap {t['gap']:.3f}, random windows' 1% level {t['null_group_p99']:.3f}, "
          f"p {t['p_value']:.3g}, "
          f"group {t['size']}, holders {t['holders']}, bar {t['bar']:.3f}")
    if "match" in r:
        m = r["match"]
        print(f"  match: threshold {m['threshold']:.3f} (outlier bar {m['outlier_bar']:.3f}): {m['holders']} "
              f"images, {m['poisons_holding']} poisons")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runtime = setup_runtime("cpu")
    study_runs(ap, lambda run, truth: study(run, truth, runtime), show)


if __name__ == "__main__":
    main()
