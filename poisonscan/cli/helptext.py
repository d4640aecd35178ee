"""Pieces of ``--help`` text built from the config dataclasses, so that the help shows the defaults the code uses.

One convention for every option: the default closes the help text in brackets, ``[VALUE]`` or ``[VALUE; NOTE]``,
and a setting without a default (one the command cannot run without) says ``(required)`` or
``(required unless --flag)``. Brackets are escaped for rich markup, which would otherwise read ``[removal]`` as a
style tag and drop it from the help.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from poisonscan.settings import PAPER, defaults_of, owner_of


def format_value(value: Any) -> str:
    """A config value as the help and the docs write it: ``0.15``, ``60/224``, ``5, 10, 20``, ``on``/``off``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"
        if float(short) == value:
            return short
        pixels = value * PAPER.reference_size
        if abs(pixels - round(pixels)) < 1e-9:          # a side given as pixels on the paper's 224 px images
            return f"{round(pixels)}/{PAPER.reference_size}"
        return repr(value)
    return str(value)


def bracket(text: str, note: str | None = None) -> str:
    """``[TEXT]`` or ``[TEXT; NOTE]``, escaped for rich markup."""
    return escape(f"[{text}; {note}]" if note else f"[{text}]")


def default(cls: type, name: str, note: str | None = None) -> str:
    """The default of config field ``name`` of ``cls`` in brackets (``default(DetectConfig, "decision.min_effect")``
    -> ``\\[0.15]``; a section's setting with a dot), with an optional note after a semicolon. Fields without a value
    (``None``, ``""``) have none to show: describe theirs with :func:`described` or mark them with :func:`required`."""
    cls, name = owner_of(cls, name)
    values = defaults_of(cls)
    if name not in values:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    value = values[name]
    if value is None or value == "" or value == []:
        raise ValueError(f"{cls.__name__}.{name} has no default value to show")
    return bracket(format_value(value), note)


def described(text: str, note: str | None = None) -> str:
    """A default the code chooses at run time (the config holds ``None``), in the same brackets:
    ``described("runs/detect/runN")`` -> ``\\[runs/detect/runN]``."""
    return bracket(text, note)


def required(unless: str | None = None) -> str:
    """``(required)``, or ``(required unless --flag ...)`` for a setting another flag or a config file can give."""
    return f"(required unless {unless})" if unless else "(required)"
