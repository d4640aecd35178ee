"""fast_vs_exact.py: one run folder detected by the exact and the fast path from its clusters, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.benchmarks.toy_runs import finished_toy_run
from tests.detect.detect_toys import one_torch_thread  # noqa: F401

from benchmarks import fast_vs_exact


def test_both_paths_resume_the_same_clusters_and_are_recorded(tmp_path: Path, one_torch_thread, monkeypatch,
                                                               capsys) -> None:
    run, _, _ = finished_toy_run(tmp_path, masks=128)
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
