"""``poisonscan poison`` on the command line: JSON summary, exit codes, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from poisonscan.cli import app
from poisonscan.data.sources import open_source

runner = CliRunner()


@pytest.fixture
def trigger(tmp_path: Path) -> Path:
    path = tmp_path / "trig.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_json_summary(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["poison", str(image_folder), "--out", str(out), "-t", f"dog={trigger}",
                              "--trigger-size", "8", "--rate", "1.0", "--val", str(image_folder), "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["train"]["poisoned"] == 3 and summary["val_patched"]["n"] == 6
    assert summary["out"] == str(out) and len(open_source(out / summary["train"]["spec"])) == 6
    assert json.loads((out / "summary.json").read_text())["targets"] == summary["targets"]


def test_human_output_and_link(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["poison", str(image_folder), "-o", str(out), "-t", f"0={trigger}", "--link",
                              "--trigger-size", "8"])
    assert res.exit_code == 0, res.output
    assert "poisoned 2 of 6 images" in res.stdout and "target 0 cat" in res.stdout
    assert (out / "train" / "dog" / "dog_0.jpg").stat().st_ino == (image_folder / "dog" / "dog_0.jpg").stat().st_ino


@pytest.mark.parametrize("args, message", [
    (["-t", "dgo={trig}"], "did you mean 'dog'"),
    (["-t", "dog={trig}", "--rate", "2"], "(0, 1]"),
    (["-t", "dog={trig}", "--trigger-size", "64"], "larger than image"),
    (["-t", "dog=nothing.png"], "not found"),
    ([], "no target"),
])
def test_refusals_exit_2(args: list[str], message: str, image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [a.format(trig=trigger) for a in args]
    res = runner.invoke(app, ["poison", str(image_folder), "--out", str(out), *args])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_needs_overwrite(image_folder: Path, trigger: Path, tmp_path: Path) -> None:
    args = ["poison", str(image_folder), "--out", str(tmp_path / "o"), "-t", f"dog={trigger}", "--trigger-size", "8"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_preset_with_shared_data(tmp_path: Path, make_images) -> None:
    shared = tmp_path / "shared"
    images = iter(make_images(7 * 3, 32, seed=7))
    for split in ("train", "val"):
        for c in range(7):
            d = shared / "imagenette-96" / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for k in range(2 if split == "train" else 1):
                next(images).save(d / f"img_{k}.png")
    (shared / "triggers").mkdir()
    Image.new("RGB", (80, 80), (255, 0, 255)).save(shared / "triggers" / "trigger_10.png")
    out = tmp_path / "out"
    res = runner.invoke(app, ["poison", "--preset", "imagenette-96", "--shared-data", str(shared), "--out", str(out),
                              "--seed", "1", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["targets"][0]["label"] == 6 and summary["targets"][0]["poisoned"] == 1   # 50% of 2
    assert summary["settings"]["seed"] == 1 and summary["settings"]["preset"] == "imagenette-96"
    assert summary["val_patched"]["n"] == 7
    truth = (out / "ground_truth.csv").read_text().splitlines()
    assert sum(1 for line in truth[1:] if line.split(",")[3] == "1") == 1
    assert ",7,7" in next(line for line in truth[1:] if line.split(",")[3] == "1")           # 50/224 of 32 px
