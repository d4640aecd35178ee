"""null_sources.py: the redrawn null sources are the ones detect cut its windows from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import DetectConfig
from poisonscan.settings import configure
from poisonscan.detect.evidence import null_sources, null_windows
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from benchmarks.studies import null_sources as null_sources_script


@pytest.mark.parametrize("pool", [None, np.array([2, 5, 7])])
def test_the_first_draw_of_null_windows_is_the_source(pool) -> None:
    imgs = torch.arange(10, dtype=torch.uint8).mul(20).view(10, 1, 1, 1).expand(10, 3, 16, 16).clone()
    wins = null_windows(imgs, 40, 5, torch.Generator().manual_seed(7), pool)
    src = null_sources(10, 40, torch.Generator().manual_seed(7), pool)
    assert [int(w[0, 0, 0]) // 20 for w in wins] == src.tolist()


def test_report_on_a_toy_run(tmp_path: Path, one_torch_thread) -> None:
    poisoned = make_poisoned_folder(tmp_path / "data")
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    truth = tmp_path / "truth.csv"
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},1\n" for i in poisoned))
    runtime = setup_runtime("cpu", precision="fp32")
    reports = {}
    for pool in ("all", "outside-topk-clusters"):
        cfg = configure(DetectConfig, data=str(tmp_path / "data"), model=str(model), out=str(tmp_path / pool),
                        clusters=4, masks=64, flip_size=40, top_k=5, null_size=64, iterations=20, batch_size=128,
                        device="cpu", precision="fp32", null_pool=pool)
        run_detect(cfg, runtime, quiet=True)
        reports[pool] = null_sources_script.null_source_report(tmp_path / pool, null_sources_script.poisoned_ids(truth))
    every, outside = reports["all"], reports["outside-topk-clusters"]
    assert every["poisons"] == outside["poisons"] == len(poisoned)
    assert outside["poisons_in_topk_clusters"] == len(poisoned)       # the toy's poisons sit in the top-k's clusters
    assert outside["null_from_poisons"] == 0 and every["null_from_poisons"] > 0
    excluded = set(json.loads((tmp_path / "outside-topk-clusters" / "evidence.json").read_text())
                   ["null_excluded_clusters"])
    assert all(b["cluster"] not in excluded for b in outside["best_null"]) and len(outside["best_null"]) == 8
    ids = json.loads((tmp_path / "all" / "ids.json").read_text())
    assert all(b["id"] in ids and b["poison"] == (b["id"] in poisoned) for b in every["best_null"])
