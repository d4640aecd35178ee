"""The demo's pipeline on a reduced budget finds the planted poisons (bundled data and threat model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from poisonscan.cli import app
from poisonscan.cli.demo import print_demo_summary
from poisonscan.config import DemoConfig
from poisonscan.demo import DEMO_MODEL, DEMO_TRAIN, run_demo


@pytest.mark.slow
def test_demo_reduced_budget_finds_planted_poisons(tmp_path, capsys):
    assert DEMO_MODEL.is_file() and DEMO_TRAIN.is_file(), "bundled demo assets are missing"
    s = run_demo(DemoConfig(out=str(tmp_path / "demo"), limit=1000, masks=64, classifier_iters=300), quiet=True)
    chance = s["planted"] / 1000
    assert s["planted"] == 50
    # the bundled threat model carries the backdoor ...
    assert s["threat_model"]["knn_asr"] > 5 * s["threat_model"]["knn_target_rate_clean"]
    # ... the detector says so and finds the poisons far above chance
    assert s["evidence"]["backdoor_found"]
    det = s["detection"]
    assert det["top20_trigger_accuracy"] >= 0.5  # chance: about the poison rate, 5%
    assert det["recall"] >= 0.8
    assert det["precision"] > 2 * chance
    assert det["auroc_poison_score"] > 0.6
    assert (tmp_path / "demo" / "detect" / "report.html").is_file()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["planted"] == 50
    assert s["runtime"]["device"] == "cpu" and "amp_dtype" in s["runtime"]       # where and how detect ran
    print_demo_summary(s)
    table = capsys.readouterr().err
    assert "poisons planted" in table and "50 of 1000" in table and "cpu" in table


def test_demo_refuses_own_data_without_pretrain(tmp_path, image_folder):
    result = CliRunner().invoke(app, ["demo", "--data", str(image_folder), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "--pretrain" in result.output
