"""benchmarks/bench.py precision: prints what ``--precision auto`` picks and each precision's speed, and writes JSON."""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.throughput import precision as bench


def test_a_tiny_run_reports_auto_and_speeds(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["bench_precision.py", "--size", "32", "--batch-size", "4", "--reps", "1",
                                      "--device", "cpu", "--precisions", "fp32", "bf16", "--json", str(out)])
    bench.main()
    row = json.loads(out.read_text())
    assert row["auto_picks"] == ("bf16" if row["cpu_native_bf16"] else "fp32")
    assert set(row["images_per_s"]) == {"fp32", "bf16"}
    assert all(v["train"] > 0 and v["infer"] > 0 for v in row["images_per_s"].values())
    text = capsys.readouterr().out
    assert f"--precision auto picks {row['auto_picks']}" in text and "| bf16 |" in text


def test_training_steps_change_the_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    before = model[0].weight.detach().clone()
    assert bench.images_per_second(model, torch.randn(2, 3, 8, 8), None, train=True, reps=1) > 0
    assert not torch.equal(before, model[0].weight)


def test_bench_dispatches_by_name(monkeypatch, capsys) -> None:
    import pytest

    from benchmarks import bench

    assert bench.NAMES == ["masking", "neighbours", "precision", "pretrain"]
    with pytest.raises(SystemExit, match="usage: python benchmarks/bench.py"):
        bench.main(["nothing"])
