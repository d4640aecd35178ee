"""Synthetic inputs of the eval tests: a detect run directory and its ground truth (values in test_detection).

Shared by tests/eval and tests/cli/test_eval.py (loaded by path there)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from poisonscan import __version__
from poisonscan.config import DetectConfig
from poisonscan.runs import config_record
from poisonscan.settings import configure

SCORE_HEADER = ["index", "id", "label", "cluster", "cluster_distance", "poison_score", "box_x", "box_y", "box_w",
                "box_h", "classifier_prob", "removed", "top_k_rank"]
TRUTH_HEADER = ["sample_id", "source_id", "poisoned", "target", "trigger", "attack", "box_x", "box_y", "box_w",
                "box_h", "image_w", "image_h"]

# id, poison_score, window, classifier_prob, removed, top_k_rank  (S = 32)
RUN_ROWS = [
    ("s0", 9, (10, 10, 8, 8), 0.9, 1, 1),
    ("s1", 7, (20, 20, 8, 8), 0.4, 0, 3),
    ("s2", None, None, 0.7, 1, None),
    ("s3", 8, (0, 0, 8, 8), 0.6, 1, 2),
    ("s4", 1, (0, 0, 8, 8), 0.1, 0, None),
    ("s5", None, None, 0.05, 0, None),
    ("s6", None, None, 0.2, 0, None),
    ("s7", None, None, 0.3, 0, None),
    ("s8", None, None, 0.1, 0, None),
    ("s9", None, None, 0.0, 0, None),
]
# poisoned images are 64 x 64: their boxes halve in the 32 x 32 frame
TRUTH_ROWS = {"s0": ("a", (20, 20, 10, 10)), "s1": ("a", (0, 0, 10, 10)), "s2": ("b", (40, 40, 10, 10))}


def write_run(root: Path, rows: list[tuple] = RUN_ROWS, size: int = 32, spec: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "scores.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SCORE_HEADER)
        for i, (sid, score, box, prob, removed, rank) in enumerate(rows):
            box = box or ("", "", "", "")
            w.writerow([i, sid, "", 0, 0.5, "" if score is None else score, *box, "" if prob is None else prob,
                        removed, "" if rank is None else rank])
    (root / "store").mkdir(exist_ok=True)
    (root / "store" / "store.json").write_text(json.dumps({"size": size, "ids": [r[0] for r in rows]}))
    summary = {"command": "detect", "method": "poisoncam", "model": {"image_size": size},
               "source": {"spec": spec or "", "kind": "folder"}}
    (root / "summary.json").write_text(json.dumps(summary))
    config = config_record(configure(DetectConfig, data=spec or "data", model="encoder.safetensors"))
    (root / "config.json").write_text(json.dumps({"version": __version__, **config}))
    (root / "stages").mkdir(exist_ok=True)
    (root / "stages" / "outputs.done").write_text("{}")
    return root


def write_truth(path: Path, ids: list[str], poisons: dict = TRUTH_ROWS, sizes: bool = True,
                extra: list[str] = ()) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TRUTH_HEADER if sizes else TRUTH_HEADER[:-2])
        for sid in list(ids) + list(extra):
            if sid in poisons:
                target, box = poisons[sid]
                row = [sid, f"orig/{sid}", 1, target, f"trigger_{target}.png", "patch", *box]
            else:
                row = [sid, sid, 0, "", "", "", "", "", "", ""]
            w.writerow(row + ([64, 64] if sizes else []))
    return path
