"""Helpers shared by the command modules: error handling, JSON output, consoles."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from poisonscan.errors import EXIT_USAGE, UsageError
from poisonscan.runs import to_json

F = TypeVar("F", bound=Callable[..., Any])

#: errors of the storage the run writes to (full disk, quota, file size limit, read-only or forbidden folder)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})

#: people-facing output goes to stderr so that ``--json`` keeps stdout machine-readable
err_console = Console(stderr=True)


def handle_errors(fn: F) -> F:
    """Turn poisonscan's usage/input errors, and storage errors (full disk, read-only or forbidden folder) that
    escape the library's own checks, into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc} (finished stages are kept; free space or fix the "
                       "folder's permissions, or choose another --out, then rerun with --resume where the command "
                       "has it)", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (nothing else goes to stdout with ``--json``)."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def overrides(**kwargs: Any) -> dict[str, Any]:
    """Flags given on the command line (``None`` means 'not given')."""
    return {k: v for k, v in kwargs.items() if v is not None}
