"""Every ``poisonscan`` command a result record gives to reproduce it parses with the command line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from poisonscan.cli import app

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _recorded_commands() -> list[tuple[str, str]]:
    out = []
    for path in sorted(RESULTS.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        commands = record.get("commands") if isinstance(record, dict) else None
        for command in commands if isinstance(commands, list) else []:
            if isinstance(command, str) and command.startswith("poisonscan "):
                out.append((str(path.relative_to(RESULTS)), command.split("  #")[0]))
    return out


def parse(argv: list[str]) -> Any:
    """Resolve ``argv`` (without the program name) to its command and parse its options (the click context),
    running nothing; a wrong flag or argument raises click's ``UsageError``."""
    cmd = typer.main.get_command(app)
    name = "poisonscan"
    while hasattr(cmd, "commands") and argv and not argv[0].startswith("-"):
        assert argv[0] in cmd.commands, f"no command {argv[0]!r} under {name!r}"
        cmd, name, argv = cmd.commands[argv[0]], argv[0], argv[1:]
    return cmd.make_context(name, list(argv))


def is_usage_error(exc: BaseException) -> bool:
    return any(c.__name__ == "UsageError" for c in type(exc).__mro__)


COMMANDS = _recorded_commands()


def test_records_give_commands() -> None:
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize(("record", "command"), COMMANDS, ids=[f"{r}:{i}" for i, (r, _) in enumerate(COMMANDS)])
def test_recorded_command_parses(record: str, command: str) -> None:
    argv = shlex.split(command)[1:]
    ctx = parse(argv)
    words = [a for a in argv if not a.startswith("-")]
    assert ctx.command.name in words[:2]                  # the command itself (``eval backdoor``: its last word)


def test_a_wrong_command_is_caught() -> None:
    for argv in (shlex.split("pretrain poisonscan/assets/demo/train-000000.tar.gz --epochs 20 --out M"),
                 ["detect", "D", "--no-such-flag"]):
        with pytest.raises(Exception) as err:
            parse(argv)
        assert is_usage_error(err.value)
