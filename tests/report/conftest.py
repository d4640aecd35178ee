"""A tiny fake detect run for the report tests: 24 images of 32 px, 4 clusters, 3 scored top images.

``fake_run`` writes ``summary.json``, ``scores.csv``, ``config.json``, ``environment.json``, ``errors.csv`` and
``removed.txt`` following the run-directory schema in docs/contracts.md, with hostile sample ids and config strings
(HTML/JS injection, rich markup) to check that everything is escaped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

N, S = 24, 32
XSS_ALERT = "<script>alert(1)</script>.png"
XSS_TITLE = ("<script>document.title='PWNED';document.body.appendChild("
             "document.createElement('pwned-marker'))</script>.png")
XSS_ATTR = "\"><img src=x onerror=\"document.title='PWNED2'\">.png"
MARKUP_ID = "[bold red]markup[/bold red].png"


@dataclass
class FakeRun:
    path: Path
    images: torch.Tensor
    summary: dict[str, Any]
    attention: dict[int, np.ndarray]
    boxes: dict[int, tuple[int, int, int, int]]
    removed: np.ndarray
    clusters: np.ndarray
    scores: dict[int, int]
    ids: list[str]
    xss_alert: str = XSS_ALERT
    xss_title: str = XSS_TITLE
    xss_attr: str = XSS_ATTR
    markup_id: str = MARKUP_ID


def _make(path: Path) -> FakeRun:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, size=(N, 3, S, S), dtype=np.uint8)
    clusters = np.arange(N) % 4
    poisoned = [1, 5, 9, 13]  # cluster 1: a bright 8x8 patch at (20, 4)
    for i in poisoned:
        images[i, :, 4:12, 20:28] = 255
    ids = [f"class_{i % 3}/img_{i:03d}.png" for i in range(N)]
    ids[1], ids[5], ids[9], ids[13] = XSS_ALERT, XSS_TITLE, XSS_ATTR, MARKUP_ID
    scored = [1, 5, 9, 2, 3, 7]
    scores = {1: 30, 5: 28, 9: 25, 2: 2, 3: 0, 7: 1}
    boxes = {i: (20, 4, 8, 8) if i in poisoned else (0, 0, 8, 8) for i in scored}
    boxes[9] = (28, 28, 8, 8)  # partly outside: the gallery clips it
    attention = {}
    yy, xx = np.mgrid[0:S, 0:S]
    for i in scored:
        x, y, w, h = boxes[i]
        attention[i] = np.exp(-((xx - x - w / 2) ** 2 + (yy - y - h / 2) ** 2) / 30.0).astype(np.float16)
    removed = np.zeros(N, dtype=bool)
    removed[poisoned] = True
    removed[17] = True  # cluster 1 too, not scored
    probs = np.where(removed, 0.9, 0.05)
    top = [{"rank": r + 1, "index": i, "id": ids[i], "cluster": int(clusters[i]), "poison_score": scores[i],
            "box": list(boxes[i])} for r, i in enumerate([1, 5, 9])]
    summary: dict[str, Any] = {
        "command": "detect", "method": "poisoncam", "run_dir": str(path), "version": "0.1.0",
        "source": {"spec": "/data/<b>set</b>", "kind": "folder", "n_samples": N + 1, "n_errors": 1},
        "model": {"checkpoint": "enc.safetensors", "arch": "resnet18", "image_size": S,
                  "metadata": {"method": "simclr"}},
        "counts": {"scanned": N, "scored": len(scored), "removed": int(removed.sum()),
                   "removed_fraction": float(removed.mean()), "errors": 1},
        "clusters": {"requested": 4, "n_clusters": 4, "flip_set": 4},
        "search": {"rounds": [{"round": 0, "live_clusters": 4, "scored": 4},
                              {"round": 1, "live_clusters": 2, "scored": 2}], "n_scored": len(scored)},
        "top_k": top,
        "top_clusters": [{"cluster": 1, "size": 6, "removed": 5, "max_score": 30},
                         {"cluster": 2, "size": 6, "removed": 0, "max_score": 2}],
        "evidence": {"topk_median": 28.0, "null_median": 1.0, "z": 9.5, "p_value": 1e-6, "best_flip_share": 0.75,
                     "null_size": 3, "min_evidence": 3.0, "backdoor_found": True, "forced": False},
        "classifier": {"trained": True, "ensemble": 1, "iterations": 50, "val_f1": 0.95, "threshold": 0.5},
        "timings": {"store": 0.5, "features": 1.25, "clusters": 0.1, "search": 4.0, "classifier": 12.0},
        "files": {"scores": "scores.csv", "removed": "removed.txt", "gallery": "gallery", "report": "report.html",
                  "summary": "summary.json"},
        "fail_on": 1, "exit_code": 1,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    (path / "config.json").write_text(json.dumps({"data": "/data/<b>set</b>", "model": "enc.safetensors",
                                                  "<key>": "</pre><script>alert(2)</script>", "top_k": 3}))
    (path / "environment.json").write_text(json.dumps({"python": "3.11", "argv": ["poisonscan", "detect"]}))
    with (path / "errors.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "reason"])
        w.writerow(["<i>broken</i>.jpg", "cannot identify image file"])
    rank_of = {e["index"]: e["rank"] for e in top}
    with (path / "scores.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "id", "label", "cluster", "cluster_distance", "poison_score", "box_x", "box_y", "box_w",
                    "box_h", "classifier_prob", "removed", "top_k_rank"])
        for i in range(N):
            box = boxes.get(i, ("", "", "", ""))
            w.writerow([i, ids[i], i % 3, int(clusters[i]), f"{0.1 * (i % 5):.3f}", scores.get(i, ""), *box,
                        f"{probs[i]:.4f}", int(removed[i]), rank_of.get(i, "")])
    (path / "removed.txt").write_text("".join(ids[i] + "\n" for i in np.flatnonzero(removed)))
    return FakeRun(path, torch.from_numpy(images), summary, attention, boxes, removed, clusters, scores, ids)


@pytest.fixture
def fake_run(tmp_path: Path) -> FakeRun:
    """The fake detect run in ``tmp_path / "run"`` (gallery not written yet)."""
    return _make(tmp_path / "run")
