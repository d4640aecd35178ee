"""Settings machinery shared by every command: typed dataclasses with ranges, nested sections, files and flags.

A command's config is a dataclass whose fields are settings (bool, int, float, str, lists of them, ``X | None``)
or *sections*: fields whose type is another such dataclass (``detect``'s ``search``, ``evidence``, ``classifier``,
``decision``). :func:`resolve_config` builds one from layers, later ones winning: the dataclass defaults, then
each given table (a preset file, a config file, a saved ``config.json``), then flags. A table nests sections as
sub-tables (``[detect.search]`` in TOML); flags name a section's setting with a dot (``search.masks``). Every value
is checked against its field's type and :class:`Range`, and a wrong one raises ``ConfigError`` naming the setting
and where it came from. This module imports nothing from the rest of poisonscan but its errors.

Its length is the whole settings machinery (types, ranges, choices, sections, files, flags, presets' tables),
kept together so that one module decides what any setting may hold.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import os
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from poisonscan.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The range a numeric setting must lie in: the one place both the config file and the flags read it from
    (``Range.error`` words a violation like Click's ``IntRange``/``FloatRange``)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        """``x>=1``, ``x>0.0``, ``0.0<=x<=1.0``, ... (Click's notation)."""
        if self.min is None:
            return f"x{'<' if self.max_open else '<='}{self.max}"
        if self.max is None:
            return f"x{'>' if self.min_open else '>='}{self.min}"
        return f"{self.min}{'<' if self.min_open else '<='}x{'<' if self.max_open else '<='}{self.max}"

    def error(self, value: float) -> str | None:
        """``None`` when ``value`` is in range, else Click's message (``0 is not in the range x>=1.``)."""
        low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        return f"{value} is not in the range {self.describe()}." if low or high else None


def at_least(lo: float) -> dict[str, Range]:
    """Field metadata: the setting must be ``>= lo``."""
    return {"range": Range(min=lo)}


def above(lo: float) -> dict[str, Range]:
    """Field metadata: the setting must be ``> lo``."""
    return {"range": Range(min=lo, min_open=True)}


def one_of(choices: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Field metadata: the setting must be one of ``choices``."""
    return {"choices": tuple(choices)}


def flag_only(flag: str) -> dict[str, str]:
    """Field metadata: a switch only the command line (``flag``) or Python turns on; a config file, preset or saved
    run that sets it is refused. File content must not allow what such a switch allows: running a pickle's code
    (``--trust-checkpoint``), clearing or reopening a folder (``--overwrite``, ``--resume``), passing unscanned
    samples on (``--keep-unreadable``)."""
    return {"flag_only": flag}


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict[str, Range]:
    """Field metadata: the setting must lie between ``lo`` and ``hi`` (each end included unless open)."""
    return {"range": Range(min=lo, max=hi, min_open=lo_open, max_open=hi_open)}


@dataclass(frozen=True)
class PaperDefaults:
    """PoisonCAM's defaults (Qian et al., section VI; the same as PatchSearch where shared)."""

    n_clusters: int = 1000          # l, k-means clusters
    n_masks: int = 256              # B, masks per image
    window: int = 60                # w, masking window and candidate trigger side on 224 px images
    reference_size: int = 224       # the image side the pixel defaults refer to
    flip_set_size: int = 1000       # images in the flip test set (1 per cluster at l = 1000)
    samples_per_cluster: int = 2    # s, images scored per live cluster per search round
    drop_fraction: float = 0.25     # r, live clusters dropped per round
    top_k: int = 20                 # poison set size
    drop_top: float = 0.10          # p, top fraction by poison score left out of the classifier's negatives
    mask_strategy: str = "full"     # full coverage masking (VI-D)
    trigger_size: int = 50          # attack: trigger side on 224 px images
    train_margin: float = 0.25      # attack: corner in [m W, (1 - m) W - size] on training images
    val_margin: float = 0.10        # attack: the same on the patched validation set


PAPER = PaperDefaults()

T = TypeVar("T")

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_LIST_KINDS = {bool: "a list of true/false values", int: "a list of integers", float: "a list of numbers",
               str: "a list of strings"}


@dataclass(frozen=True)
class _Spec:
    """What a field accepts: ``base`` (bool, int, float or str), a list of them, ``None`` too, a :class:`Range`."""

    base: type
    is_list: bool
    optional: bool
    range: Range | None
    choices: tuple[str, ...] | None = None

    def kind(self) -> str:
        text = (_LIST_KINDS if self.is_list else _KINDS)[self.base]
        return f"{text} or null" if self.optional else text


@functools.cache
def _specs(cls: type) -> dict[str, _Spec | None]:
    """The :class:`_Spec` of every field of ``cls`` (``None`` for an annotation outside the supported set)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Spec | None] = {}
    for f in fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = len(args) < len(typing.get_args(tp)), (args[0] if len(args) == 1 else None)
        is_list = typing.get_origin(tp) is list
        if is_list:
            tp = (typing.get_args(tp) or (None,))[0]
        rng = f.metadata.get("range")
        out[f.name] = _Spec(tp, is_list, optional, rng, f.metadata.get("choices")) if tp in _KINDS else None
    return out


def field_range(cls: type, name: str) -> Range | None:
    """The :class:`Range` the setting ``name`` of the config dataclass ``cls`` (a section's: ``search.masks``) must
    lie in (``None``: any)."""
    cls, name = owner_of(cls, name)
    spec = _specs(cls).get(name)
    return spec.range if spec else None


@functools.cache
def _flag_only(cls: type) -> dict[str, str]:
    """``{setting: flag}`` of the fields of ``cls`` with :func:`flag_only` metadata."""
    return {f.name: f.metadata["flag_only"] for f in fields(cls) if "flag_only" in f.metadata}


def _show(value: Any, width: int = 60) -> str:
    """A value as the config file would spell it (``null``, ``true``, ``"abc"``, ``1.5``), on one short line.

    Spelled piece by piece and stopped once ``width`` is passed: a YAML file's aliases can nest a few hundred bytes
    into a value of billions of items, which a whole ``json.dumps`` would expand."""
    parts: list[str] = []

    class Full(Exception):
        pass

    def put(text: str) -> None:
        parts.append(text)
        if sum(map(len, parts)) > width:
            raise Full

    def spell(v: Any) -> None:
        if isinstance(v, dict):
            put("{")
            for i, (k, x) in enumerate(v.items()):
                put((", " if i else "") + json.dumps(str(k), ensure_ascii=False) + ": ")
                spell(x)
            put("}")
        elif isinstance(v, (list, tuple)):
            put("[")
            for i, x in enumerate(v):
                put(", " if i else "")
                spell(x)
            put("]")
        else:
            try:
                put(json.dumps(v, default=str, ensure_ascii=False))
            except (TypeError, ValueError):
                put(repr(v))

    try:
        spell(value)
    except Full:
        pass
    text = "".join(parts)
    return text if len(text) <= width else text[:width - 3] + "..."


def _convert(value: Any, base: type) -> Any:
    """``value`` as ``base`` (ints widen to float, paths to str), or ``None`` when it is not one."""
    if base is bool:
        return value if isinstance(value, bool) else None
    if base is str:
        return value if isinstance(value, str) else os.fspath(value) if isinstance(value, os.PathLike) else None
    if isinstance(value, bool):                         # true/false is not a number here
        return None
    if base is int:
        return int(value) if isinstance(value, numbers.Integral) else None
    if isinstance(value, numbers.Real) and math.isfinite(value):  # NaN and infinity are not settings
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _check_value(cls: type, name: str, value: Any, subject: str) -> Any:
    """``value`` converted for the field ``name`` of ``cls``; ``ConfigError`` (worded with ``subject``) when its type
    or range is wrong."""
    spec = _specs(cls).get(name)
    if spec is None:
        return value
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{subject} must be {spec.kind()}, got null")
    if spec.is_list != isinstance(value, list | tuple):
        raise ConfigError(f"{subject} must be {spec.kind()}, got {_show(value)}")
    items = [_convert(v, spec.base) for v in (value if spec.is_list else [value])]
    if any(v is None for v in items):
        raise ConfigError(f"{subject} must be {spec.kind()}, got {_show(value)}")
    if spec.range is not None:
        for v in items:
            msg = spec.range.error(v)
            if msg:
                raise ConfigError(f"{subject}: {msg}")
    if spec.choices is not None:
        for v in items:
            if v not in spec.choices:
                raise ConfigError(f"{subject}: {_show(v)} is not one of {', '.join(spec.choices)}")
    return items if spec.is_list else items[0]


def _one_line(exc: BaseException) -> str:
    """A parser's message on one line (YAML's span several lines, with a caret under the culprit)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use .toml, .yaml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {_one_line(exc)}") from None
    errors: tuple[type[BaseException], ...] = (ValueError, RecursionError)   # TOML and JSON errors are ValueErrors
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            errors += (yaml.YAMLError,)
            data = yaml.safe_load(text)
            data = {} if data is None else data
    except errors as exc:
        raise ConfigError(f"config file {path} is not valid: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def section_type(cls: type, name: str) -> type | None:
    """The dataclass of the section ``name`` of ``cls`` (``None`` when ``name`` is a plain setting)."""
    tp = typing.get_type_hints(cls).get(name)
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def sections(cls: type) -> dict[str, type]:
    """``{name: dataclass}`` of the sections of ``cls``, in field order."""
    return {f.name: tp for f in fields(cls) if (tp := section_type(cls, f.name)) is not None}


def _unknown(cls: type, key: Any, where: str, prefix: str) -> ConfigError:
    if not isinstance(key, str):
        return ConfigError(f"setting name {_show(key)} in {where} is not a string")
    known = [f"{prefix}{f.name}" for f in fields(cls)]
    known += [f"{name}.{f.name}" for name, sec in sections(cls).items() for f in fields(sec)] if not prefix else []
    close = difflib.get_close_matches(f"{prefix}{key.replace('-', '_')}", known, n=1, cutoff=0.6)
    if not close:       # a setting that moved into a section: 'masks' -> 'search.masks'
        close = [k for k in known if k.rsplit(".", 1)[-1] == key.replace("-", "_")][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown setting '{prefix}{key}' in {where}{hint}")


def _check_table(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """``data`` checked against ``cls`` (sections as nested tables): the converted values, names normalised."""
    names = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in names:
            raise _unknown(cls, key, where, prefix)
        sub = section_type(cls, name)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"setting '{prefix}{key}' in {where} must be a table of settings")
            out[name] = _check_table(sub, value, where, f"{prefix}{name}.")
        else:
            out[name] = _check_value(cls, name, value, f"setting '{prefix}{key}' in {where}")
            flag = _flag_only(cls).get(name)
            if flag and out[name]:
                raise ConfigError(f"setting '{prefix}{key}' in {where}: only the {flag} flag turns it on, never a "
                                  "file")
    return out


def _check_flags(cls: type, flags: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """Flag values (``None``: not given) as a nested table; ``section.key`` names a section's setting, worded
    ``--set section.key`` in errors unless ``names`` gives its own flag (``{"search.masks": "--masks"}``)."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        head, _, rest = key.replace("-", "_").partition(".")
        sub = section_type(cls, head) if rest else None
        if rest and sub is None or not rest and section_type(cls, head) is not None:
            raise _unknown(cls, key, "flags", "")
        target, owner, name = (out.setdefault(head, {}), sub, rest) if sub is not None else (out, cls, head)
        if name not in {f.name for f in fields(owner)}:
            raise _unknown(cls, key, "flags", "")
        flag = (names or {}).get(key) or (f"--{key.replace('_', '-')}" if sub is None else f"--set {key}")
        target[name] = _check_value(owner, name, value, flag)
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``top``, section tables merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_table(path: Path | str, section: str | None = None) -> dict[str, Any]:
    """The settings table of a TOML, YAML or JSON file; with ``section``, its ``[section]`` table when it has one
    (a file shared by several commands)."""
    data = _read_file(Path(path))
    if section and section in data and isinstance(data[section], dict):
        data = data[section]
    return data


def build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from a checked nested table (sections built from their sub-tables)."""
    kwargs = {k: (build(sub, v) if (sub := section_type(cls, k)) is not None else v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None


def resolve_config(cls: type[T], file: Path | str | None = None, overrides: dict[str, Any] | None = None, *,
                   tables: list[tuple[str, dict[str, Any]]] | None = None, flag_names: dict[str, str] | None = None
                   ) -> T:
    """Build ``cls`` from its defaults, then each ``(where, table)`` of ``tables`` (a preset, say), then ``file``,
    then ``overrides`` (flags; ``None`` values are skipped, ``section.key`` names a section's setting, worded in
    errors as ``flag_names`` says or as ``--set section.key``).

    Every value is checked against its field's annotation (``int``, ``float`` (an int too), ``str``, ``bool``,
    ``X | None``, lists of them; ``true``/``false`` is not a number) and its :class:`Range` metadata; a wrong one
    or an unknown name raises ``ConfigError`` naming the setting and where it came from.
    """
    layers = list(tables or [])
    if file:
        layers.append((str(file), read_table(file, cls.__name__.removesuffix("Config").lower())))
    values: dict[str, Any] = {}
    for where, table in layers:
        values = _merge(values, _check_table(cls, table, where))
    if overrides:
        values = _merge(values, _check_flags(cls, overrides, flag_names))
    return build(cls, values)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: the key and the value read as a TOML value (``0.5``, ``true``, ``"x"``, ``[1, 2]``),
    or as a plain string when it is not one (``refine_by=p``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: give KEY=VALUE (search.masks=64, decision.min_effect=0.1)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def check_config(cfg: Any, prefix: str = "") -> None:
    """Check every setting of a config built in Python (not through :func:`resolve_config`) against its type,
    range and choices; ``ConfigError`` names the first wrong one (``setting 'search.masks'``)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if section_type(type(cfg), f.name) is not None:
            check_config(value, f"{prefix}{f.name}.")
        else:
            _check_value(type(cfg), f.name, value, f"setting '{prefix}{f.name}'")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (sections as nested dicts, Paths as str)."""
    if not is_dataclass(cfg):
        raise TypeError("not a config dataclass")
    return json.loads(json.dumps(asdict(cfg), default=str))


def defaults_of(cls: type) -> dict[str, Any]:
    """The default value of every field of ``cls`` (for docs and tests; a section as its dataclass)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def stage(name: str, **metadata: Any) -> dict[str, Any]:
    """Field metadata: the first pipeline stage whose result depends on the setting (a section: on any of its
    settings); a resume reruns from there when the setting changed. Combine with a range: ``stage("x",
    **at_least(1))``."""
    return {"stage": name, **metadata}


def stage_of(cls: type, name: str) -> str | None:
    """The stage the field ``name`` of ``cls`` is read from first (``None``: it shapes no result)."""
    return next((f.metadata.get("stage") for f in fields(cls) if f.name == name), None)


def owner_of(cls: type, dotted: str) -> tuple[type, str]:
    """The dataclass that holds the setting ``dotted`` (``search.masks``: the search section) and its name there."""
    head, _, rest = dotted.partition(".")
    sub = section_type(cls, head) if rest else None
    return (sub, rest) if sub is not None else (cls, dotted)


def flat_defaults(cls: type) -> dict[str, Any]:
    """The default of every setting of ``cls``, a section's named with a dot (``search.masks``)."""
    out: dict[str, Any] = {}
    for name, value in defaults_of(cls).items():
        sub = section_type(cls, name)
        out.update({f"{name}.{k}": v for k, v in flat_defaults(sub).items()} if sub is not None else {name: value})
    return out


def dotted_names(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` keyed by their full names: a top-level setting as it is, a section's setting by its own name
    (``masks`` -> ``search.masks``; every setting name is unique across a config's sections) or already dotted."""
    where = {f"{name}": f"{sec}.{name}" for sec, sub in sections(cls).items() for name in defaults_of(sub)}
    top = {f.name for f in fields(cls)} - set(sections(cls))
    out = {}
    for key, value in settings.items():
        if key in top or "." in key:
            out[key] = value
        elif key in where:
            out[where[key]] = value
        else:
            raise _unknown(cls, key, "settings", "")
    return out


def configure(cls: type[T], **settings: Any) -> T:
    """``cls`` from keyword settings, checked like flags: ``configure(DetectConfig, data=..., masks=64,
    min_effect=0.1)`` (a section's setting by its own name, see :func:`dotted_names`)."""
    return resolve_config(cls, None, dotted_names(cls, settings))
