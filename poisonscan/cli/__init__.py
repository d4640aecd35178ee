"""The ``poisonscan`` command line: one thin module per command.

Each command module exposes ``register(app)``; the modules parse flags into the command's config object, call the
library, and print a summary. No algorithm lives here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer

from poisonscan import __version__
from poisonscan.cli.common import debug_enabled, report_internal_error, set_debug

app = typer.Typer(
    name="poisonscan",
    help="Find and remove backdoor-poisoned images from unlabeled image data sets (PoisonCAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = ("demo", "pretrain", "poison", "detect", "clean", "eval")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"poisonscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error (also "
                                                            "POISONSCAN_DEBUG=1).")) -> None:
    """poisonscan: data sources -> encoder -> features -> clusters -> masking -> search -> classifier -> outputs."""
    set_debug(debug)
    ctx.call_on_close(lambda: set_debug(False))


for _name in COMMANDS:
    importlib.import_module(f"poisonscan.cli.{_name}").register(app)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (also ``python -m poisonscan``); ``argv`` defaults to ``sys.argv[1:]``.

    The commands report their own errors (``cli.common.handle_errors``); an exception raised outside them, while
    Typer/Click parses the command line, is reported the same way: one line on stderr and exit code 2 (the traceback
    too with ``--debug`` or ``POISONSCAN_DEBUG=1``). ``SystemExit`` (Typer's exit codes) passes through.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args)
    except Exception as exc:  # noqa: BLE001 - a crash must exit 2, never 1 ("findings")
        sys.exit(report_internal_error(exc, debug_enabled() or "--debug" in args))
