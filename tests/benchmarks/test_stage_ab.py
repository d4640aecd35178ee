"""stage_ab.py: one finished run resumed from one stage with two settings, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

from poisonscan.config import DetectConfig
from poisonscan.detect.pipeline import run_detect
from poisonscan.runtime import setup_runtime
from poisonscan.settings import configure
from benchmarks import stage_ab


def test_the_classifier_trained_or_not_on_one_run_from_its_match(tmp_path: Path, one_torch_thread, monkeypatch,
                                                                 capsys) -> None:
    data = tmp_path / "data"
    poisoned = make_poisoned_folder(data)
    ids = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    truth = tmp_path / "ground_truth.csv"
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},{int(i in poisoned)}\n" for i in ids))
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    run = tmp_path / "run"
    cfg = configure(DetectConfig, data=str(data), model=str(model), out=str(run), clusters=4, masks=64,
                    flip_size=40, top_k=5, null_size=64, iterations=20, ensemble=1, rounds=1, batch_size=128,
                    device="cpu", precision="fp32")
    run_detect(cfg, setup_runtime("cpu", precision="fp32"), quiet=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["stage_ab", "--run", str(run), "--work", str(tmp_path / "work"), "--name",
                                      "toy", "--from", "match", "--a", "classifier.train=always", "--b",
                                      "classifier.train=unless-matched", "--truth", str(truth), "--out", str(out)])
    stage_ab.main()
    rec = json.loads(out.read_text())
    a, b = rec["a"], rec["b"]
    assert a["settings"] == {"classifier.train": "always"} and a["classifier_trained"] and not b["classifier_trained"]
    assert b["classifier_skipped"].startswith("the picture match makes the removal")
    assert set(a["stage_seconds"]) == {"match", "classifier", "verify", "outputs"}     # from the match stage on
    assert a["removed"] == b["removed"] == 20 and rec["removed_difference"] == {"only_a": [], "only_b": []}
    assert a["recall"] == b["recall"] == 1.0 and a["forwards"]["match"] == 0
    for side in ("a", "b"):                          # the earlier stages' records reused, not recomputed
        assert (tmp_path / "work" / side / "search.json").read_bytes() == before[run / "search.json"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    text = capsys.readouterr().out
    assert "s classifier" in text and "removed only by a 0, only by b 0" in text
