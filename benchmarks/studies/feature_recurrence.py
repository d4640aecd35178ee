"""Would comparing windows by the threat model's features let the recurrence test see a trigger changed copy by copy?

    python -m benchmarks.studies.feature_recurrence RUN_DIR TRUTH_CSV [RUN_DIR TRUTH_CSV ...] [--json OUT]

(TRUTH_CSV ``-`` for a run on clean data.)

The recurrence test compares the top-k windows pixel by pixel, so copies of a trigger that were scaled, turned and
recoloured one by one (``poisonscan poison --scale-jitter --rotation --colour-jitter``) are not alike to it. This
study compares them as the threat model sees them instead: each window pasted at the centre of a grey canvas of the
model's input size and embedded; two windows are alike when the cosine of their features reaches the 99th
percentile of 256 random windows' pairs (embedded the same way), and the largest group of the top-k is compared
with the largest groups of 20 random windows (1,000 draws), as the pixel test does. A second null asks whether the
groups come from the selection rather than from a trigger: the windows the masking picks in the evidence test's
first 256 random images (``benchmarks/studies/search_like_null.py``), embedded the same way. Prints, per finished
detect run folder, the recorded pixel test and the feature test against both nulls, with how many of each group
are poisons (``-`` for TRUTH_CSV on clean data). Costs k + 512 forwards per run and the masking of 256 images.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonscan.data.store import open_store
from poisonscan.detect.evidence import null_windows
from poisonscan.detect.features import encode, prepare_encoder
from poisonscan.detect.masking import cut_windows
from poisonscan.detect.recurrence import REFERENCE_SIZE, group_test
from poisonscan.eval.detection import read_truth
from poisonscan.models.checkpoints import load_encoder
from poisonscan.runtime import setup_runtime

from benchmarks.studies.search_like_null import search_like_windows

GREY = 128


def embed(encoder: Any, windows: torch.Tensor, side: int, runtime: Any) -> torch.Tensor:
    """L2-normalised features of ``windows`` (uint8 n x 3 x w x w), each pasted at the centre of a grey canvas."""
    w = int(windows.shape[-1])
    canvas = torch.full((len(windows), 3, side, side), GREY, dtype=torch.uint8)
    o = (side - w) // 2
    canvas[:, :, o:o + w, o:o + w] = windows
    with torch.inference_mode():
        feats = torch.as_tensor(np.asarray(encode(encoder, canvas, runtime))).float()
    return F.normalize(feats, dim=1)


def study(run: Path, truth: Path | None, runtime: Any, n_boot: int = 1000, seed: int = 0,
          centre: bool = False) -> dict[str, Any]:
    cfg = json.loads((run / "config.json").read_text())
    search = json.loads((run / "search.json").read_text())
    ev = json.loads((run / "evidence.json").read_text())
    encoder, _ = load_encoder(cfg["model"], arch=cfg.get("arch"), image_size=cfg.get("image_size"))
    encoder = prepare_encoder(encoder.eval(), runtime)
    images, top, tw, nw = top_and_random_windows(run, search, ev, seed)
    side = int(images.shape[-1])
    top_f = embed(encoder, tw, side, runtime)
    top_sim = _self_sim(top_f)
    like = embed(encoder, search_like_windows(run, encoder, runtime), side, runtime)
    tests = {name: group_test(top_sim, _self_sim(ref), n_boot, seed)
             for name, ref in (("features", embed(encoder, nw, side, runtime)), ("features_search_like", like))}
    if centre:      # what the search-like windows share taken out of both before the cosine
        mean = like.mean(0, keepdim=True)
        tests["features_search_like_centred"] = group_test(_self_sim(F.normalize(top_f - mean, dim=1)),
                                                           _self_sim(F.normalize(like - mean, dim=1)), n_boot, seed)
    poison = poisons_of(run, truth, top)
    rec = ev.get("recurrence") or {}
    return {"run": str(run), "k": len(top), "poisons_in_top_k": int(sum(poison)),
            "pixels": {"size": rec.get("size"), "p_value": rec.get("p_value"),
                       "poisons_in_group": int(sum(poison[top.index(i)] for i in rec.get("members", [])
                                                   if i in top))},
            **{name: {"size": t["size"], "bar": t["bar"], "null_group_p99": t["null_group_p99"],
                      "p_value": t["p_value"], "poisons_in_group": int(sum(poison[m] for m in t["members"]))}
               for name, t in tests.items()}}


def top_and_random_windows(run: Path, search: dict[str, Any], ev: dict[str, Any], seed: int = 0
                           ) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """A run's images, its top-k (image indices), their windows and 256 uniform random windows (drawn with
    ``seed``)."""
    images = open_store(run / "store").images
    boxes = {int(e["index"]): e["box"] for e in search["scored"]}
    top = [int(i) for i in ev["top_k"]]
    tw = cut_windows(images[torch.as_tensor(top)], torch.as_tensor([boxes[i] for i in top]))
    nw = null_windows(images, REFERENCE_SIZE, int(tw.shape[-1]), torch.Generator().manual_seed(seed))
    return images, top, tw, nw


def poisons_of(run: Path, truth: Path | None, indices: list[int]) -> list[bool]:
    """Whether each image ``indices`` of a run is a poison (all False without a ground truth)."""
    ids = json.loads((run / "ids.json").read_text())
    flag: dict[str, bool] = {}
    if truth is not None:
        gt = read_truth(truth)
        flag = dict(zip(gt.ids, gt.poisoned.tolist()))
    return [flag.get(ids[i], False) for i in indices]


def run_truth_pairs(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[tuple[Path, Path | None]]]:
    """Parse ``RUN_DIR TRUTH_CSV`` pairs (``-``: clean data) and ``--json``, with the parser's other options."""
    ap.add_argument("pairs", nargs="+", help="RUN_DIR TRUTH_CSV pairs (TRUTH_CSV - for a clean-data run)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give RUN_DIR TRUTH_CSV pairs")
    return args, [(Path(r), None if t == "-" else Path(t)) for r, t in zip(args.pairs[::2], args.pairs[1::2])]


def write_runs(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """The study's rows as ``{"runs": rows}`` at ``path`` (nothing without one)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": rows}, indent=1) + "\n")


def study_runs(ap: argparse.ArgumentParser, study: Callable[[Path, Path | None], dict[str, Any]],
               show: Callable[[dict[str, Any]], None]) -> None:
    """A study's command line: ``study`` on each ``RUN_DIR TRUTH_CSV`` pair, each row shown, all written to
    ``--json``."""
    args, pairs = run_truth_pairs(ap)
    rows = []
    for run, truth in pairs:
        rows.append(study(run, truth))
        show(rows[-1])
    write_runs(args.json, rows)


def _self_sim(feats: torch.Tensor) -> np.ndarray:
    return (feats @ feats.T).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--centre", action="store_true",
                    help="also the test on features centred on the search-like windows' mean")
    args, pairs = run_truth_pairs(ap)
    runtime = setup_runtime("cpu", "auto")
    rows = []
    for run, truth in pairs:
        r = study(run, truth, runtime, centre=args.centre)
        rows.append(r)
        px, ft, fs = r["pixels"], r["features"], r["features_search_like"]
        print(f"{run}: {r['poisons_in_top_k']} poisons in the top {r['k']}; pixels: group {px['size']} "
              f"({px['poisons_in_group']} poisons), p {px['p_value']:.3f}; features: group {ft['size']} "
              f"({ft['poisons_in_group']} poisons), p {ft['p_value']:.3f}; against search-like windows: group "
              f"{fs['size']} ({fs['poisons_in_group']} poisons), p {fs['p_value']:.3f}", flush=True)
        if "features_search_like_centred" in r:
            fc = r["features_search_like_centred"]
            print(f"  centred on the search-like windows' mean: group {fc['size']} ({fc['poisons_in_group']} "
                  f"poisons), p {fc['p_value']:.3f}", flush=True)
    write_runs(args.json, rows)


if __name__ == "__main__":
    main()
