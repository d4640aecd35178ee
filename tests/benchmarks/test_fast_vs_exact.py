"""fast_vs_exact.py: one run folder detected by the exact and the fast path from its clusters, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import DetectConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from poisonscan.settings import configure
from benchmarks import fast_vs_exact


def test_both_paths_resume_the_same_clusters_and_are_recorded(tmp_path: Path, one_torch_thread, monkeypatch,
                                                               capsys) -> None:
    data = tmp_path / "data"
    make_poisoned_folder(data)
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    run = tmp_path / "run"
    cfg = configure(DetectConfig, data=str(data), model=str(model), out=str(run), clusters=4, masks=128,
                    flip_size=40, top_k=5, null_size=64, iterations=20, ensemble=1, rounds=1, batch_size=128,
                    device="cpu", precision="fp32")
    run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    clusters = (run / "clusters.npz").read_bytes()
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["fast_vs_exact", "--run", str(run), "--work", str(tmp_path / "work"),
                                      "--name", "toy", "--out", str(out)])
    fast_vs_exact.main()
    rec = json.loads(out.read_text())
    ex, fa = rec["exact"], rec["fast"]
    for name in ("exact", "fast"):                                   # the clusters reused, not recomputed
        assert (tmp_path / "work" / name / "clusters.npz").read_bytes() == clusters
        assert json.loads((tmp_path / "work" / name / "stages" / "features.done").read_text())
    search = {n: json.loads((tmp_path / "work" / n / "search.json").read_text()) for n in ("exact", "fast")}
    assert search["exact"]["masking"] == "exact" and search["exact"]["masks_per_image"] == 128
    assert search["fast"]["masking"] == "coarse-to-fine" and search["fast"]["masks_per_image"] == 73
    assert ex["forwards"]["features"] == fa["forwards"]["features"] == 200        # the reused stage's count
    assert fa["forwards"]["search"] < ex["forwards"]["search"] and rec["forwards_ratio"] > 1
    assert rec["top_k_overlap"] >= 4 and ex["removed"] == fa["removed"] >= 18
    assert rec["removed_difference"] == {"only_exact": [], "only_fast": []}
    printed = capsys.readouterr().out
    assert "fw total" in printed and "forwards" in printed and "top-k overlap" in printed
