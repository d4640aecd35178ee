"""The ``poisonscan`` command line: one thin module per command.

Each command module exposes ``register(app)``; the modules parse flags into the command's config object, call the
library, and print a summary. No algorithm lives here.
"""

from __future__ import annotations

import importlib

import typer

from poisonscan import __version__

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
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """poisonscan: data sources -> encoder -> features -> clusters -> masking -> search -> classifier -> outputs."""


for _name in COMMANDS:
    importlib.import_module(f"poisonscan.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
