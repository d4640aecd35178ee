"""``poisonscan detect`` through Typer's CliRunner: exit codes, --json, --fail-on, --set, --preset, --resume."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.detect.detect_toys import make_poisoned_folder, save_toy_checkpoint, one_torch_thread  # noqa: F401

from poisonscan.cli import app
from poisonscan.cli.detect import parse_window
from poisonscan.errors import ConfigError

runner = CliRunner()

SMALL = {"clusters": 4, "batch_size": 128, "device": "cpu", "precision": "fp32",
         "search": {"masks": 64, "flip_size": 40}, "evidence": {"top_k": 5, "null_size": 64},
         "classifier": {"iterations": 100}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_toy")
    make_poisoned_folder(root / "data")
    (root / "small.json").write_text(json.dumps({"detect": SMALL}))
    return {"data": root / "data", "model": save_toy_checkpoint(root / "toy.safetensors"),
            "config": root / "small.json"}


def detect(toy: dict[str, Path], out: Path, *extra: str):
    args = ["detect", str(toy["data"]), "--model", str(toy["model"]), "--out", str(out), "--config",
            str(toy["config"]), *extra]
    return runner.invoke(app, args)


def test_fail_on_exit_codes_and_json(toy, tmp_path):
    res = detect(toy, tmp_path / "a", "--fail-on", "5", "--json")
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout)                          # stdout holds the JSON only
    assert summary["exit_code"] == 1 and summary["fail_on"] == 5
    assert summary["counts"]["removed"] > 5 and summary["evidence"]["backdoor_found"]
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == summary
    # the same findings under a fraction threshold they do not exceed (resume: nothing is recomputed but the
    # outputs stage, whose setting changed)
    res = runner.invoke(app, ["detect", "--resume", str(tmp_path / "a"), "--fail-on", "0.5", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("backdoor signal found: removed ")


def test_min_evidence_removes_nothing_and_passes_fail_on(toy, tmp_path):
    res = detect(toy, tmp_path / "b", "--set", "decision.min_evidence=1e9", "--set", "decision.weak_signal_p=0",
                 "--fail-on", "0")
    assert res.exit_code == 0, res.output
    assert "Overview" in res.stdout and "Evidence" in res.stdout
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["counts"]["removed"] == 0 and summary["verdict"] == "no backdoor signal"
    assert (tmp_path / "b" / "removed.txt").read_text() == ""


def test_unreadable_samples_fail_closed(toy, tmp_path):
    """A sample detect could not read is reported, fails a --fail-on gate, and is left out by clean."""
    data = tmp_path / "data"
    shutil.copytree(toy["data"], data)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, format="JPEG")
    (data / "c0" / "trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    res = detect({**toy, "data": data}, tmp_path / "u", "--set", "decision.min_evidence=1e9", "--set",
                 "decision.weak_signal_p=0", "--fail-on", "0",
                 "--json")
    assert res.exit_code == 1, res.output                     # nothing removed, but one sample went unscanned
    summary = json.loads(res.stdout)
    assert summary["counts"]["removed"] == 0 and summary["counts"]["unreadable"] == 1
    assert summary["fail_on_unreadable"] == 0 and "could not be read" in summary["exit_reasons"][0]
    assert "c0/trunc.jpg" in (tmp_path / "u" / "errors.csv").read_text()
    assert "1 sample(s) could not be read and were not scanned" in (tmp_path / "u" / "report.html").read_text()

    res = runner.invoke(app, ["detect", "--resume", str(tmp_path / "u"), "--fail-on-unreadable", "1", "-q"])
    assert res.exit_code == 0, res.output                     # one unreadable sample allowed

    res = runner.invoke(app, ["clean", "--run", str(tmp_path / "u"), "--out", str(tmp_path / "clean.txt")])
    assert res.exit_code == 0, res.output
    kept = (tmp_path / "clean.txt").read_text()
    assert "trunc.jpg" not in kept and "poison_000.png" in kept


@pytest.mark.parametrize("extra, message", [
    (["--window", "sixty"], "--window"),
    (["--method", "gradcam"], "--method"),
    (["--set", "search.mask_strategy=diagonal"], "--set search.mask_strategy: \"diagonal\" is not one of full"),
    (["--set", "decision.min_effect=2"], "--set decision.min_effect: 2.0 is not in the range 0.0<=x<=1.0."),
    (["--set", "decision.min_efect=0.1"], "did you mean 'decision.min_effect'?"),
    (["--set", "masks=8"], "name a stage's setting as SECTION.KEY"),
    (["--set", "search.masks"], "give KEY=VALUE"),
    (["--preset", "../paper"], "--preset ../paper: choose one of default, paper, patchsearch"),
])
def test_usage_errors_exit_2(toy, tmp_path, extra, message):
    res = detect(toy, tmp_path / "c", *extra)
    assert res.exit_code == 2
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "c" / "stages").exists()


def test_input_errors_exit_2(toy, tmp_path):
    res = runner.invoke(app, ["detect", str(toy["data"]), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--model" in res.stderr
    res = runner.invoke(app, ["detect", str(tmp_path / "missing"), "--model", str(toy["model"]), "--out",
                              str(tmp_path / "d")])
    assert res.exit_code == 2 and "error:" in res.stderr
    res = runner.invoke(app, ["detect", str(toy["data"]), "--model", str(tmp_path / "none.safetensors")])
    assert res.exit_code == 2 and "error:" in res.stderr
    res = runner.invoke(app, ["detect", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a detect run" in res.stderr
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{}")
    res = runner.invoke(app, ["detect", "--resume", str(tmp_path / "e"), "--config", str(toy["config"])])
    assert res.exit_code == 2 and "--resume" in res.stderr


def test_parse_window():
    assert parse_window("60/224") == pytest.approx(60 / 224)
    assert parse_window("17") == 17.0 and parse_window("0.25") == 0.25 and parse_window(None) is None
    for bad in ("0", "-3", "1/0", "a/b"):
        with pytest.raises(ConfigError):
            parse_window(bad)


def test_help_lists_the_flags():
    res = runner.invoke(app, ["detect", "--help"])
    assert res.exit_code == 0
    for flag in ("--model", "--method", "--fail-on", "--set", "--preset", "--resume", "--window", "--json"):
        assert flag in res.stdout
