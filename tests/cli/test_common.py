"""cli.common.handle_errors: storage errors become one line and exit 2; other errors are not hidden."""

from __future__ import annotations

import errno

import pytest
import typer

from poisonscan.cli.common import handle_errors


def test_storage_oserror_is_one_line_and_exit_2(capsys) -> None:
    @handle_errors
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/scan1/features.npy")

    with pytest.raises(typer.Exit) as exc:
        write()
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /runs/scan1/features.npy: No space left on device") and err.count("\n") == 1


def test_other_oserror_is_not_swallowed() -> None:
    @handle_errors
    def broken() -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        broken()
