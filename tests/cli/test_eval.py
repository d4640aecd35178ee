"""``poisonscan eval detection | probe | backdoor`` through Typer's CliRunner, exit code 2 cases included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from poisonscan.cli import app
from tests.eval import eval_synthetic as synthetic

runner = CliRunner()
IDS = [r[0] for r in synthetic.RUN_ROWS]


# ----------------------------------------------------------------------------------------------- detection
def test_detection_json_csv_plots(tmp_path: Path) -> None:
    run = synthetic.write_run(tmp_path / "run")
    truth = synthetic.write_truth(tmp_path / "truth.csv", IDS)
    res = runner.invoke(app, ["eval", "detection", "--run", str(run), "--truth", str(truth), "--json",
                              "--csv", str(tmp_path / "m.csv"), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["removal"]["recall"] == pytest.approx(2 / 3) and out["counts"]["removed"] == 3
    assert out["scores"]["poison_score"]["auroc"] == pytest.approx(15.5 / 21)
    assert out["triggers"]["topk"]["5"]["accuracy"] == pytest.approx(0.25)
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {"scope": "all", "metric": "removal.precision", "value": str(2 / 3)} in rows
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "classifier_prob_hist.png", "poison_score_hist.png", "pr_curve.png", "roc_curve.png"]
    people = runner.invoke(app, ["eval", "detection", "--run", str(run), "--truth", str(truth)])
    assert people.exit_code == 0 and "Detection" in people.stdout and "Per target" in people.stdout


def test_detection_usage_errors(tmp_path: Path) -> None:
    run = synthetic.write_run(tmp_path / "run")
    bad_truth = synthetic.write_truth(tmp_path / "t.csv", IDS, extra=["ghost"])
    res = runner.invoke(app, ["eval", "detection", "--run", str(run), "--truth", str(bad_truth)])
    assert res.exit_code == 2 and "absent from the run" in res.output
    (tmp_path / "empty").mkdir()
    truth = synthetic.write_truth(tmp_path / "truth.csv", IDS)
    res = runner.invoke(app, ["eval", "detection", "--run", str(tmp_path / "empty"), "--truth", str(truth)])
    assert res.exit_code == 2 and "not a detect run folder" in res.output
    res = runner.invoke(app, ["eval", "detection", "--run", str(run)])
    assert res.exit_code == 2 and "--truth" in res.output


# ----------------------------------------------------------------------------------------------- probe / backdoor
def _folder(root: Path, n: int, seed: int) -> Path:
    """ImageFolder with classes a (reddish) and b (bluish), ``n`` 32 px images each."""
    rng = np.random.default_rng(seed)
    for c, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from poisonscan.models.checkpoints import save_encoder
    from poisonscan.models.encoders import create_encoder

    path = tmp_path_factory.mktemp("model") / "enc.safetensors"
    return save_encoder(create_encoder("vit_tiny_patch16_224", 32, depth=1), path, method="test")


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    trigger = tmp_path / "trigger.png"
    Image.fromarray(np.full((20, 20, 3), (255, 255, 0), np.uint8)).save(trigger)
    return {"train": _folder(tmp_path / "train", 10, 0), "val": _folder(tmp_path / "val", 6, 1), "trigger": trigger}


def test_probe_with_trigger_and_cache(model: Path, data: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import poisonscan.eval.encoding as encoding

    calls = []
    real = encoding.extract_features
    monkeypatch.setattr(encoding, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "probe"
    args = ["eval", "probe", "--model", str(model), "--train", str(data["train"]), "--val", str(data["val"]),
            "--trigger", str(data["trigger"]), "--target", "b", "--fraction", "0.5", "--epochs", "5",
            "--out", str(out), "--device", "cpu", "--json", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["train"]["n_labelled"] == 10 and summary["val"]["n"] == 12
    t = summary["targets"][0]
    assert t["name"] == "b" and t["non_target_patched"] == 6 and 0 <= t["asr"] <= 1
    assert t["asr"] == pytest.approx(t["fp_patched"] / 6)
    for name in ("summary.json", "metrics.csv", "confusion_clean.csv", "confusion_patched0.csv",
                 "probe.safetensors", "config.json", "environment.json"):
        assert (out / name).is_file(), name
    assert len(calls) == 3  # train subset, clean val, patched val
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(calls) == 3  # everything came from the cache
    assert json.loads(res.stdout)["targets"] == summary["targets"]


def test_probe_usage_errors(model: Path, data: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "probe", "--model", str(model), "--val", str(data["val"]), "--device", "cpu"]
    unlabelled = tmp_path / "list.txt"
    unlabelled.write_text("".join(f"{p}\n" for p in sorted(data["train"].rglob("*.png"))))
    res = runner.invoke(app, base + ["--train", str(unlabelled), "--target", "b"])
    assert res.exit_code == 2 and "no label" in res.output
    res = runner.invoke(app, base + ["--train", str(data["train"]), "--target", "zebra"])
    assert res.exit_code == 2 and "unknown target class" in res.output
    res = runner.invoke(app, base + ["--train", str(data["train"]), "--target", "b", "--val-patched",
                                     str(data["val"]), "--trigger", str(data["trigger"])])
    assert res.exit_code == 2 and "not both" in res.output


def test_backdoor_with_truth(model: Path, data: dict[str, Path], tmp_path: Path) -> None:
    truth = tmp_path / "truth.csv"
    ids = sorted(str(p.relative_to(data["train"])) for p in data["train"].rglob("*.png"))
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},{int(i.startswith('b/b1'))}\n" for i in ids))
    args = ["eval", "backdoor", "--model", str(model), "--data", str(data["val"]), "--trigger", str(data["trigger"]),
            "--target", "b", "--train", str(data["train"]), "--truth", str(truth), "--k", "5",
            "--out", str(tmp_path / "bd"), "--device", "cpu", "--json", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["knn"]["bank"] == "train" and out["knn"]["non_target"] == 6
    assert out["clusters"]["n_poisons"] == 1 and out["clusters"]["n_clusters"] == 2
    assert out["flips"]["flip_set"] == 2 and out["probe"] is not None
    assert (tmp_path / "bd" / "metrics.csv").is_file() and (tmp_path / "bd" / "summary.json").is_file()
    res = runner.invoke(app, [a for a in args if a != "--json"])            # -q alone: no table either
    assert res.exit_code == 0 and res.stdout == "", res.output
    few = [a if a != "5" else "50" for a in args if a != "--json"]          # k over the target's bank images
    res = runner.invoke(app, few[:few.index("--out") + 1] + [str(tmp_path / "bd50")] + few[few.index("--out") + 2:])
    assert res.exit_code == 0 and res.stdout == "" and "warning: the k-NN bank holds" in res.stderr, res.output
    truth.write_text("sample_id,poisoned\nnot/here.png,1\n")
    res = runner.invoke(app, args[:-4] + ["--out", str(tmp_path / "bd2"), "--device", "cpu"])
    assert res.exit_code == 2 and "not in the ground truth" in res.output


def test_backdoor_of_a_cleaned_manifest_against_the_original_truth(model: Path, data: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """``clean`` writes full paths; the truth names files relative to the data root: they still match."""
    ids = sorted(str(p.relative_to(data["train"])) for p in data["train"].rglob("*.png"))
    truth = tmp_path / "truth.csv"
    truth.write_text("sample_id,poisoned\n" + "".join(f"{i},{int(i in ('b/b1.png', 'b/b2.png'))}\n" for i in ids))
    manifest = tmp_path / "clean.tsv"               # b/b1.png removed, b/b2.png missed
    manifest.write_text("".join(f"{data['train'] / i}\t{int(i[0] == 'b')}\n" for i in ids if i != "b/b1.png"))
    res = runner.invoke(app, ["eval", "backdoor", "--model", str(model), "--data", str(data["val"]), "--trigger",
                              str(data["trigger"]), "--target", "b", "--train", str(manifest), "--truth", str(truth),
                              "--k", "5", "--out", str(tmp_path / "bd"), "--device", "cpu", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["clusters"]["n_poisons"] == 1


def test_backdoor_blend_and_ctrl_attacks(model: Path, data: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "backdoor", "--model", str(model), "--data", str(data["val"]), "--target", "b", "--k", "3",
            "--device", "cpu", "--json", "--quiet"]
    res = runner.invoke(app, base + ["--trigger", str(data["trigger"]), "--attack", "blend", "--blend-alpha", "0.3",
                                     "--out", str(tmp_path / "blend")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["attack"] == "blend"
    res = runner.invoke(app, base + ["--attack", "ctrl", "--out", str(tmp_path / "ctrl")])   # no trigger file
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["attack"] == "ctrl"
    res = runner.invoke(app, base + ["--attack", "blend", "--out", str(tmp_path / "x")])     # blend needs one
    assert res.exit_code == 2 and "--trigger" in res.output
    res = runner.invoke(app, base + ["--trigger", str(data["trigger"]), "--attack", "wanet"])
    assert res.exit_code == 2 and "choose one of" in res.output
