"""cli.common.handle_errors: storage errors, crashes and Ctrl-C become one line and an exit code (never 1);
Typer's own exits pass through."""

from __future__ import annotations

import errno
import sys

import pytest
import typer

from poisonscan.cli.common import handle_errors, set_debug


def test_storage_oserror_is_one_line_and_exit_2(capsys) -> None:
    @handle_errors
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/scan1/features.npy")

    with pytest.raises(typer.Exit) as exc:
        write()
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /runs/scan1/features.npy: No space left on device") and err.count("\n") == 1


@pytest.fixture
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POISONSCAN_DEBUG", raising=False)
    set_debug(False)


def test_other_oserror_is_an_internal_error(capsys, no_debug) -> None:
    @handle_errors
    def broken() -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(typer.Exit) as exc:
        broken()
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: OSError: [Errno 5] Input/output error (rerun with --debug")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_crash_is_one_line_and_exit_2_with_the_traceback_under_debug(capsys, monkeypatch, no_debug) -> None:
    @handle_errors
    def crash() -> None:
        raise KeyError("missing\nkey")

    with pytest.raises(typer.Exit) as exc:
        crash()
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert err == ("error: internal error: KeyError: 'missing\\nkey' (rerun with --debug or POISONSCAN_DEBUG=1 to see "
                   "the traceback)\n")

    monkeypatch.setenv("POISONSCAN_DEBUG", "1")
    with pytest.raises(typer.Exit) as exc:
        crash()
    err = capsys.readouterr().err
    assert exc.value.exit_code == 2 and err.startswith("Traceback (most recent call last)")
    assert err.splitlines()[-1] == "error: internal error: KeyError: 'missing\\nkey'"


@pytest.mark.parametrize("code", [0, 1, 2])
def test_typer_exit_passes_through(code: int, no_debug) -> None:
    """``typer.Exit(1)`` is how detect reports findings over --fail-on: it must not become an internal error."""
    @handle_errors
    def findings() -> None:
        raise typer.Exit(code)

    with pytest.raises(typer.Exit) as exc:
        findings()
    assert exc.value.exit_code == code


def test_keyboard_interrupt_exits_130(capsys) -> None:
    @handle_errors
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exc:
        interrupted()
    assert exc.value.exit_code == 130 and capsys.readouterr().err == "interrupted\n"


def test_system_exit_passes_through() -> None:
    @handle_errors
    def leave() -> None:
        sys.exit(3)

    with pytest.raises(SystemExit) as exc:
        leave()
    assert exc.value.code == 3
