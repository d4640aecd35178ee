"""Bad ``--config`` files, out-of-range values and crashes: every command exits 2 with one line on stderr.

Exit 1 means "findings over --fail-on" to a CI job, so no usage error and no crash may exit 1 or print a traceback.
Every config failure here happens before a model is built or data is read.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.models import OptionInfo
from typer.testing import CliRunner

import poisonscan.cli
from poisonscan.cli import app, main
from poisonscan.cli import clean as clean_cli
from poisonscan.cli import demo as demo_cli
from poisonscan.cli import detect as detect_cli
from poisonscan.cli import eval as eval_cli
from poisonscan.cli import poison as poison_cli
from poisonscan.cli import pretrain as pretrain_cli
from poisonscan.config import (CleanConfig, DemoConfig, DetectConfig, EvalBackdoorConfig, EvalDetectionConfig,
                               EvalProbeConfig, PoisonConfig, PretrainConfig)
from poisonscan.settings import Range, _specs, field_range, sections

runner = CliRunner()

#: every command, its config class, and settings of it to spoil: (an int setting, that setting as a list or not,
#: a str setting, (a setting, an out-of-range value, Click's message for it))
COMMANDS: dict[str, tuple[type, str, bool, str, tuple[str, Any, str]]] = {
    "demo": (DemoConfig, "retrain_epochs", False, "device",
             ("retrain_epochs", -1, "-1 is not in the range x>=0.")),
    "pretrain": (PretrainConfig, "epochs", False, "method", ("batch_size", 1, "1 is not in the range x>=2.")),
    "poison": (PoisonConfig, "ctrl_block", False, "attack", ("margin", 0.7, "0.7 is not in the range 0.0<=x<0.5.")),
    "detect": (DetectConfig, "clusters", False, "feature_dtype", ("clusters", 0, "0 is not in the range x>=1.")),
    "clean": (CleanConfig, "shard_size", False, "out", ("shard_size", 0, "0 is not in the range x>=1.")),
    "eval detection": (EvalDetectionConfig, "topk", True, "run",
                       ("fpr", [0.5, 1], "1.0 is not in the range 0.0<x<1.0.")),
    "eval probe": (EvalProbeConfig, "epochs", False, "optimizer",
                   ("fraction", 2, "2.0 is not in the range 0.0<x<=1.0.")),
    "eval backdoor": (EvalBackdoorConfig, "k", False, "attack", ("k", 0, "0 is not in the range x>=1.")),
}

#: malformed config files by name: syntax errors, and binary garbage (not UTF-8) under a config suffix
MALFORMED: dict[str, bytes] = {
    "bad.yaml": b"masks: [1, 2\nwindow: 0.2\n",
    "tab.yml": b"\tmasks: 1\n",
    "bad.toml": b"masks = \n",
    "bad.json": b'{"masks": 1,}',
    "binary.toml": b"\xff\xfe\x00masks = 1\n",
    "binary.json": b"\x89PNG\r\n\x1a\n\x00\x00",
}


def invoke(command: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [*command.split(), *args], env=env)


def one_error_line(res: Any) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_malformed_files(command: str, tmp_path: Path) -> None:
    for name, content in MALFORMED.items():
        path = tmp_path / name
        path.write_bytes(content)
        line = one_error_line(invoke(command, "--config", str(path)))
        assert str(path) in line and ("is not valid" in line or "cannot be read" in line), line


def _wrong_types(command: str) -> list[tuple[str, Any, str]]:
    """(setting, bad value, expected kind) for string/null/float/bool for an int, and a list for a str."""
    _, int_name, as_list, str_name, _ = COMMANDS[command]
    wrap = (lambda v: [v]) if as_list else (lambda v: v)
    kind = "a list of integers" if as_list else "an integer"
    return [(int_name, wrap("abc"), kind), (int_name, None, kind), (int_name, wrap(1.5), kind),
            (int_name, wrap(True), kind), (str_name, ["x", "y"], "a string")]


@pytest.mark.parametrize("command, setting, value, kind",
                         [(c, *case) for c in COMMANDS for case in _wrong_types(c)])
def test_wrong_type(command: str, setting: str, value: Any, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({setting: value}))
    line = one_error_line(invoke(command, "--config", str(path)))
    assert f"setting '{setting}' in {path} must be {kind}" in line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_out_of_range(command: str, fmt: str, tmp_path: Path) -> None:
    setting, value, message = COMMANDS[command][-1]
    path = tmp_path / f"bad.{fmt}"
    if fmt == "toml":
        path.write_text(f"{setting} = {json.dumps(value)}\n")
    else:
        path.write_text(json.dumps({setting: value}))        # JSON is YAML too
    line = one_error_line(invoke(command, "--config", str(path)))
    assert line == f"error: setting '{setting}' in {path}: {message}"


def test_float_for_an_int_is_not_rounded(tmp_path: Path) -> None:
    """``masks: 1.5`` is refused, not truncated; ``drop_fraction: 0`` (an int for a float) is fine."""
    path = tmp_path / "c.yaml"
    path.write_text("detect:\n  search:\n    masks: 1.5\n")
    assert "setting 'search.masks' in" in (line := one_error_line(invoke("detect", "--config", str(path))))
    assert "must be an integer, got 1.5" in line
    path.write_text("detect:\n  search:\n    drop_fraction: 0\n    masks: 64\n")
    line = one_error_line(invoke("detect", "--config", str(path)))      # the config is fine: DATA is missing
    assert "no data set" in line


def test_flag_out_of_range_without_a_typer_bound() -> None:
    """``--k`` has no Typer bound: the config's range refuses it, in the flag's words."""
    assert one_error_line(invoke("eval backdoor", "--k", "0")) == "error: --k: 0 is not in the range x>=1."


#: flags that set a section's setting
FLAG_FIELDS = {"masks": "search.masks", "flip_size": "search.flip_size"}

#: the function behind each command (its parameters' defaults are Typer's OptionInfo with min/max)
FUNCTIONS = {"demo": demo_cli.demo, "pretrain": pretrain_cli.pretrain, "poison": poison_cli.poison,
             "detect": detect_cli.detect, "clean": clean_cli.clean, "eval detection": eval_cli.detection,
             "eval probe": eval_cli.probe, "eval backdoor": eval_cli.backdoor}


@pytest.mark.parametrize("command", COMMANDS)
def test_flag_bounds_agree_with_the_config(command: str) -> None:
    """Every Typer ``min``/``max`` on a flag equals the range metadata of its setting, and the flag refuses a value
    just outside it (exit 2) like the config file does."""
    cls = COMMANDS[command][0]
    assert any(field_range(cls, f.name) for f in dataclasses.fields(cls))
    bounded = [(name, p.default) for name, p in inspect.signature(FUNCTIONS[command]).parameters.items()
               if isinstance(p.default, OptionInfo) and (p.default.min is not None or p.default.max is not None)]
    for name, info in bounded:
        rng = field_range(cls, FLAG_FIELDS.get(name, name) if cls is DetectConfig else name)
        assert rng is not None, f"{command} {name}: a bounded flag of an unbounded setting"
        assert (rng.min, rng.max) == (info.min, info.max), name
        assert (rng.min_open, rng.max_open) == (getattr(info, "min_open", False), getattr(info, "max_open", False))
        flag = info.param_decls[0] if info.param_decls else f"--{name.replace('_', '-')}"
        bad = rng.max + 1 if rng.max is not None else rng.min - 1
        res = invoke(command, flag, str(bad))
        assert res.exit_code == 2 and flag in res.stderr, (flag, res.stderr)
        assert rng.error(bad) is not None
    assert bounded or command in ("poison", "eval detection", "eval probe", "eval backdoor")


def test_range_messages_are_worded_like_click() -> None:
    assert Range(min=1).error(0) == "0 is not in the range x>=1."
    assert Range(min=0.0, min_open=True).error(0.0) == "0.0 is not in the range x>0.0."
    assert Range(min=0.0, max=1.0).error(1.5) == "1.5 is not in the range 0.0<=x<=1.0."
    assert Range(min=0.0, max=0.5, max_open=True).error(0.5) == "0.5 is not in the range 0.0<=x<0.5."
    assert Range(max=3).error(4) == "4 is not in the range x<=3."
    assert Range(min=0.0, max=1.0).error(1.0) is None and Range(min=1).error(1) is None


def test_every_setting_has_a_checked_type() -> None:
    for cls in (DemoConfig, PretrainConfig, PoisonConfig, DetectConfig, CleanConfig, EvalDetectionConfig,
                EvalProbeConfig, EvalBackdoorConfig, *sections(DetectConfig).values()):
        untyped = {name for name, spec in _specs(cls).items() if spec is None}
        assert untyped == set(sections(cls)), cls.__name__      # only the sections, whose settings are checked


# ------------------------------------------------------------------------------------------------- window


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from poisonscan.models import create_encoder, save_encoder

    return save_encoder(create_encoder("test_resnet", 32), tmp_path_factory.mktemp("m") / "m32.safetensors",
                        method="random")


@pytest.mark.parametrize("window, message", [
    ("500", "500 px is larger than the model's 32 px images"),
    ("33", "33 px is larger than the model's 32 px images"),
])
def test_window_larger_than_the_image(window: str, message: str, model32: Path, tmp_path: Path) -> None:
    res = invoke("detect", str(tmp_path / "data"), "--model", str(model32), "--out", str(tmp_path / "run"),
                 "--window", window, "--device", "cpu")
    assert message in one_error_line(res)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--window", "3/2"], "a fraction of the image side must be below 1"),
    (["--window", "224/224"], "a fraction of the image side must be below 1"),
    (["--window", "17.5"], "give whole pixels"),
    (["--window", "40", "--image-size", "32"], "40 px is larger than the model's 32 px images"),
])
def test_window_refused_before_the_model_loads(args: list[str], message: str, tmp_path: Path) -> None:
    res = invoke("detect", "data", "--model", str(tmp_path / "missing.safetensors"), *args)
    assert message in one_error_line(res)


# ------------------------------------------------------------------------------------------------- crashes


def _boom(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("boom\nsecond line")


def test_unexpected_exception_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("poisonscan.eval.runner.run_detection", _boom)
    monkeypatch.delenv("POISONSCAN_DEBUG", raising=False)
    line = one_error_line(invoke("eval detection", "--run", "r", "--truth", "t.csv"))
    assert line.startswith("error: internal error: RuntimeError: boom second line")
    assert "--debug" in line and "POISONSCAN_DEBUG=1" in line


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("poisonscan.eval.runner.run_detection", _boom)
    monkeypatch.delenv("POISONSCAN_DEBUG", raising=False)
    args = ["eval", "detection", "--run", "r", "--truth", "t.csv"]
    if how == "env":
        res = runner.invoke(app, args, env={"POISONSCAN_DEBUG": "1"})
    else:
        res = runner.invoke(app, ["--debug", *args])
    assert res.exit_code == 2
    assert "Traceback (most recent call last)" in res.stderr and "_boom" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == "error: internal error: RuntimeError: boom second line"


class _Unprintable:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("cannot format the version")


def test_exception_while_parsing_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The eager ``--version`` callback runs while Click parses, outside every command's own handling."""
    monkeypatch.setattr(poisonscan.cli, "__version__", _Unprintable())
    monkeypatch.delenv("POISONSCAN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: internal error: RuntimeError: cannot format the version")

    with pytest.raises(SystemExit) as exc:
        main(["--debug", "--version"])
    assert exc.value.code == 2 and "Traceback" in capsys.readouterr().err


def test_python_m_poisonscan(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             tmp_path: Path) -> None:
    """``python -m poisonscan`` goes through the same entry point: a bad config and a crash both exit 2."""
    monkeypatch.delenv("POISONSCAN_DEBUG", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("masks: [1\n")
    monkeypatch.setattr(sys, "argv", ["poisonscan", "detect", "--config", str(bad)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("poisonscan", run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: config file {bad} is not valid")

    monkeypatch.setattr(poisonscan.cli, "__version__", _Unprintable())
    monkeypatch.setattr(sys, "argv", ["poisonscan", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("poisonscan", run_name="__main__")
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: internal error: RuntimeError")


@pytest.mark.parametrize("text", ["[decision]\nmin_effect = inf\n", "[detect.decision]\nmin_effect = nan\n"])
def test_non_finite_numbers_are_refused(text: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = one_error_line(invoke("detect", "--config", str(path)))
    assert "setting 'decision.min_effect'" in line and "must be a number" in line
