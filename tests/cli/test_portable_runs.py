"""Run folders that work from any folder and can be shared: absolute paths in ``config.json``, outputs with the
umask's mode, one process per run folder, ``-q`` not frozen in a run, and the flags every command takes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from poisonscan.cli import app
from poisonscan.runs import LOCK_NAME
from tests.detect import detect_toys as toys  # registers the toy threat model
from tests.eval import eval_synthetic as synthetic

runner = CliRunner()
TESTS = Path(__file__).resolve().parents[1]
one_torch_thread = toys.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the small budget of tests/cli/test_detect.py; no classifier (the evidence gate stays shut)
SMALL = ["--clusters", "4", "--masks", "64", "--flip-size", "40", "--set", "evidence.top_k=5", "--set",
         "evidence.null_size=64", "--batch-size", "128", "--device", "cpu", "--precision", "fp32", "--set",
         "decision.min_evidence=1e9", "--set", "decision.weak_signal_p=0"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A detect run made with relative paths from its root folder under umask 027 (``-q``), right after a start
    into the same ``--out`` that was refused (its data does not exist)."""
    root = tmp_path_factory.mktemp("portable")
    toys.make_poisoned_folder(root / "data")
    toys.save_toy_checkpoint(root / "toy.safetensors")
    cwd, mask = os.getcwd(), os.umask(0o027)
    try:
        os.chdir(root)
        refused = runner.invoke(app, ["detect", "missing", "--model", "toy.safetensors", "--out", "scan", *SMALL])
        ran = runner.invoke(app, ["detect", "data", "--model", "toy.safetensors", "--out", "scan", *SMALL, "-q"])
    finally:
        os.chdir(cwd)
        os.umask(mask)
    return {"root": root, "run": root / "scan", "refused": refused, "ran": ran}


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")
            if p.is_file()}


def test_a_refused_start_leaves_no_config_behind(scan: dict) -> None:
    assert scan["refused"].exit_code == 2 and "missing does not exist" in scan["refused"].stderr
    # the same --out, without --overwrite: not refused as "not empty"
    assert scan["ran"].exit_code == 0, scan["ran"].output


def test_config_holds_absolute_paths_and_no_presentation_switch(scan: dict) -> None:
    root, run = scan["root"], scan["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(root / "data") and config["model"] == str(root / "toy.safetensors")
    assert config["out"] == str(root / "scan")
    assert "quiet" not in config and "overwrite" not in config and "resume" not in config
    assert json.loads((run / "summary.json").read_text())["source"]["spec"] == "data"     # as typed


def test_detect_outputs_get_the_umask_mode(scan: dict) -> None:
    modes = _modes(scan["run"])
    assert {"config.json", "scores.csv", "report.html", "store/images.npy", "gallery/topk.png"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}
    assert not (scan["run"] / LOCK_NAME).exists()                       # the lock went with the command


def test_a_shared_run_resumes_and_cleans_from_another_folder(scan: dict, tmp_path: Path, umask,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shutil.copytree(scan["run"], shared)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    umask(0o022)
    res = runner.invoke(app, ["clean", "--run", str(shared), "--out", "clean.txt", "--reshard", "shards"])
    assert res.exit_code == 0, res.output
    assert "kept 200" in res.stdout
    assert _modes(elsewhere) and set(_modes(elsewhere).values()) == {0o644}
    # the scan ran with -q: a resume without it prints the tables
    res = runner.invoke(app, ["detect", "--resume", str(shared), "--fail-on", "0.5"])
    assert res.exit_code == 0, res.output
    assert "Overview" in res.stdout
    assert _modes(shared)["summary.json"] == 0o644


HOLD = ("import sys; from poisonscan.runs import lock_run; lock = lock_run(sys.argv[1]); print('locked', flush=True);"
        " sys.stdin.read()")


@pytest.fixture
def hold() -> Iterator[Callable[[Path], int]]:
    """``hold(folder)`` locks ``folder`` in another process and returns its pid; it lets go when the test ends."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc.pid

    yield start
    for proc in procs:
        proc.communicate("", timeout=30)


def test_a_run_folder_in_use_is_refused(scan: dict, tmp_path: Path, hold) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    pid = hold(busy)
    res = runner.invoke(app, ["detect", str(scan["root"] / "data"), "--model", str(scan["root"] / "toy.safetensors"),
                              "--out", str(busy), "--overwrite", *SMALL])
    assert res.exit_code == 2
    assert res.stderr == f"error: run folder {busy} is in use by another poisonscan process (pid {pid})\n"
    assert (busy / LOCK_NAME).read_text() == f"{pid}\n"                 # --overwrite kept the holder's lock
    shared = tmp_path / "shared"
    shutil.copytree(scan["run"], shared)
    pid = hold(shared)
    before = (shared / "summary.json").read_bytes()
    res = runner.invoke(app, ["detect", "--resume", str(shared), "--fail-on", "3"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and f"(pid {pid})" in res.stderr
    assert (shared / "stages" / "outputs.done").is_file() and (shared / "summary.json").read_bytes() == before


def test_pretrain_and_eval_outputs_get_the_umask_mode(image_folder: Path, tmp_path: Path, umask) -> None:
    umask(0o027)
    out = tmp_path / "pretrain"
    res = runner.invoke(app, ["pretrain", "--data", str(image_folder), "--arch", "test_resnet", "--image-size", "16",
                              "--proj-hidden", "64", "--proj-dim", "32", "--epochs", "1", "--batch-size", "4",
                              "--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--out", str(out),
                              "-q"])
    assert res.exit_code == 0, res.output
    modes = _modes(out)
    assert {"encoder.safetensors", "last.pt", "config.json", "log.csv"} <= set(modes)
    assert set(modes.values()) == {0o640}
    assert json.loads((out / "config.json").read_text())["data"] == str(image_folder)
    run = synthetic.write_run(tmp_path / "run")
    truth = synthetic.write_truth(tmp_path / "truth.csv", [r[0] for r in synthetic.RUN_ROWS])
    res = runner.invoke(app, ["eval", "detection", "--run", str(run), "--truth", str(truth), "--csv",
                              str(tmp_path / "eval" / "m.csv"), "--plots", str(tmp_path / "eval" / "plots")])
    assert res.exit_code == 0, res.output
    assert len(_modes(tmp_path / "eval")) == 5 and set(_modes(tmp_path / "eval").values()) == {0o640}


def test_clean_and_eval_detection_take_the_common_flags(file_list: Path, tmp_path: Path) -> None:
    removed = tmp_path / "removed.txt"
    removed.write_text("images/img_0.png\n")
    res = runner.invoke(app, ["clean", "--source", str(file_list), "--removed", str(removed), "--out",
                              str(tmp_path / "c.txt"), "-q", "--seed", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and (tmp_path / "c.txt").is_file()
    run = synthetic.write_run(tmp_path / "run")
    truth = synthetic.write_truth(tmp_path / "truth.csv", [r[0] for r in synthetic.RUN_ROWS])
    res = runner.invoke(app, ["eval", "detection", "--run", str(run), "--truth", str(truth), "--json", "-q",
                              "--seed", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counts"]["removed"] == 3 and "Detection" not in res.stderr


def test_every_command_takes_the_common_flags() -> None:
    """README: every command takes --config, --device, --seed, --json and -q."""
    for command in (["demo"], ["pretrain"], ["poison"], ["detect"], ["clean"], ["eval", "detection"],
                    ["eval", "probe"], ["eval", "backdoor"]):
        res = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert res.exit_code == 0
        missing = [flag for flag in ("--config", "--device", "--seed", "--json", "-q") if flag not in res.stdout]
        assert not missing, (command, missing)
