"""``poisonscan.scan`` and ``DetectRun.load``: a run from Python, read back with its records, scores and removal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.detect.detect_toys import make_poisoned_folder, one_torch_thread, save_toy_checkpoint  # noqa: F401

import poisonscan
from poisonscan.detect.outputs import SUMMARY_KEYS
from poisonscan.detect.run import DetectRun
from poisonscan.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(clusters=4, masks=64, flip_size=40, top_k=5, null_size=64, iterations=20, rounds=1, ensemble=1,
             batch_size=128, device="cpu", precision="fp32")


def test_scan_returns_the_run_and_load_reads_it_back(tmp_path: Path) -> None:
    poisoned = make_poisoned_folder(tmp_path / "data")
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")
    run = poisonscan.scan(tmp_path / "data", model, out=tmp_path / "run", **SMALL)
    assert isinstance(run, poisonscan.DetectRun) and run.finished and run.done[-1] == "outputs"
    assert run.config.search.masks == 64 and run.config.classifier.ensemble == 1 and run.config.preset == "default"
    assert run.verdict == "backdoor signal found" and run.reason.startswith("backdoor signal")
    assert list(run.summary) == list(SUMMARY_KEYS)
    assert sorted(run.removed) == sorted(poisoned)
    scores = run.scores
    assert len(scores) == 200 and scores.ids[:1] == [run.summary["top_k"][0]["id"]] or len(scores) == 200
    assert set(np.asarray(scores.ids)[scores.removed]) == set(run.removed)
    assert np.isfinite(scores["poison_score"]).sum() == run.summary["counts"]["scored"]
    assert scores.boxes.shape == (200, 4) and run.evidence.z == run.summary["evidence"]["z"]
    assert run.search.completed and run.verify is not None and run.search.scored[0].poison_score == \
        run.search.scores[run.search.scored[0].index]
    # the picture match makes the removal, so no classifier trains (classifier.train = unless-matched)
    assert not run.classifier.trained and run.classifier.skipped and run.classifier.probs is None
    assert run.match.searched and run.match.match.shape == (200,)
    assert int((run.match.match >= run.match.picture_match.threshold - 1e-9).sum()) == len(run.removed)
    again = DetectRun.load(tmp_path / "run")
    assert again.config == run.config and again.removed == run.removed
    # a changed setting on resume reruns what it shapes
    forced = poisonscan.scan(None, None, resume=tmp_path / "run", fail_on=1, device="cpu")
    assert forced.config.fail_on == 1 and forced.summary["exit_code"] == 1 and forced.config.search.masks == 64


def test_a_partial_run_has_records_up_to_its_last_stage(tmp_path: Path) -> None:
    from poisonscan.detect import pipeline as P

    make_poisoned_folder(tmp_path / "data")
    model = save_toy_checkpoint(tmp_path / "toy.safetensors")

    class Stop(Exception):
        pass

    def stop(round_: int) -> None:
        raise Stop

    from poisonscan.config import DetectConfig
    from poisonscan.settings import configure

    cfg = configure(DetectConfig, data=str(tmp_path / "data"), model=str(model), out=str(tmp_path / "part"), **SMALL)
    with pytest.raises(Stop):
        P.run_detect(cfg, quiet=True, on_round=stop)
    run = DetectRun.load(tmp_path / "part")
    assert not run.finished and run.done == ["store", "features", "clusters"]
    assert run.search is None and run.evidence is None and run.summary is None and run.verdict is None
    with pytest.raises(UsageError, match="has no scores.csv yet"):
        run.scores
    with pytest.raises(UsageError, match="not found"):
        DetectRun.load(tmp_path / "nothing")
