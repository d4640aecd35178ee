"""Helpers shared by the command modules: error handling, JSON output, consoles."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from poisonscan.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from poisonscan.runs import to_json

F = TypeVar("F", bound=Callable[..., Any])

#: errors of the storage the run writes to (full disk, quota, file size limit, read-only or forbidden folder)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})

#: people-facing output goes to stderr so that ``--json`` keeps stdout machine-readable
err_console = Console(stderr=True)


#: set to 1 (or true/yes/on) to see the traceback of an internal error, like the root option ``--debug``
DEBUG_ENV = "POISONSCAN_DEBUG"

#: Typer's own exceptions (exits, aborts, and the usage errors it reports itself, from whichever Click it uses):
#: a command's ``typer.Exit(1)`` for findings passes through untouched
CLI_EXCEPTIONS: tuple[type[BaseException], ...] = (
    typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))

_debug_flag = False     # the root option --debug of the invocation being run (reset when it ends)


def set_debug(on: bool) -> None:
    """Record the root option ``--debug`` for the invocation being run."""
    global _debug_flag
    _debug_flag = bool(on)


def debug_enabled() -> bool:
    """True with ``POISONSCAN_DEBUG=1`` in the environment or ``poisonscan --debug`` on the command line."""
    return _debug_flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def report_internal_error(exc: BaseException, debug: bool) -> int:
    """Print an unexpected exception as one line on stderr (after its traceback when ``debug``); returns the exit
    code, 2: a crash must not read as exit 1, "findings over --fail-on"."""
    if debug:
        traceback.print_exception(exc)
    message = " ".join(str(exc).split())
    if len(message) > 400:
        message = message[:397] + "..."
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 to see the traceback)"
    typer.echo(f"error: internal error: {what}{hint}", err=True)
    return EXIT_USAGE


def handle_errors(fn: F) -> F:
    """Turn every error of a command into one line on stderr and an exit code, never 1 (findings):

    - poisonscan's usage/input errors and storage errors (full disk, read-only or forbidden folder) that escape the
      library's own checks: exit 2;
    - a closed stdout (broken pipe): exit 2;
    - Ctrl-C: exit 130;
    - any other exception, an internal error: exit 2, its traceback too with ``--debug`` or ``POISONSCAN_DEBUG=1``.

    Click's and Typer's own exits and usage errors (``typer.Exit``, ``typer.BadParameter``) pass through.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CLI_EXCEPTIONS:
            raise
        except UsageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no second error when Python flushes stdout
                typer.echo("error: stdout was closed before the output was written (broken pipe)", err=True)
                raise typer.Exit(EXIT_USAGE) from None
            if exc.errno not in STORAGE_ERRNOS:
                raise typer.Exit(report_internal_error(exc, debug_enabled())) from None
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc} (finished stages are kept; free space or fix the "
                       "folder's permissions, or choose another --out, then rerun with --resume where the command "
                       "has it)", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - anything else is a bug: one line, not a traceback and exit 1
            raise typer.Exit(report_internal_error(exc, debug_enabled())) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (nothing else goes to stdout with ``--json``)."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def overrides(**kwargs: Any) -> dict[str, Any]:
    """Flags given on the command line (``None`` means 'not given')."""
    return {k: v for k, v in kwargs.items() if v is not None}
