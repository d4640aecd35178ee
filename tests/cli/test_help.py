"""``--help`` of every command shows the config's defaults, and docs/commands/*.md state the same defaults.

Conventions checked here (poisonscan/cli/helptext.py writes the help side):

- help: an option's default closes its help text as ``[VALUE]`` or ``[VALUE; NOTE]``; a setting the command needs
  says ``(required ...)``;
- docs: every option of a command is a row of a ``| flag | default | meaning |`` table on its page (``eval.md``:
  under the subcommand's ``## `eval NAME` `` heading); the default cell starts with the value (``1000``,
  ``60/224``, ``removal``, ``off``), or ``(required ...)``, or describes a default the code chooses at run time
  (config ``None``). Config-only settings are rows of a ``| setting | default | meaning |`` table.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from poisonscan.cli import COMMANDS, app
from poisonscan.config import (CleanConfig, DemoConfig, DetectConfig, EvalBackdoorConfig, EvalDetectionConfig,
                               EvalProbeConfig, PoisonConfig, PretrainConfig)
from poisonscan.settings import flat_defaults

DOCS = Path(__file__).parents[2] / "docs" / "commands"

CONFIGS: dict[tuple[str, ...], type] = {
    ("demo",): DemoConfig, ("pretrain",): PretrainConfig, ("poison",): PoisonConfig, ("detect",): DetectConfig,
    ("clean",): CleanConfig, ("eval", "detection"): EvalDetectionConfig, ("eval", "probe"): EvalProbeConfig,
    ("eval", "backdoor"): EvalBackdoorConfig,
}
#: parameters whose name is not their config field's (a section's setting: ``search.masks``)
ALIASES = {"reshard_dir": "reshard", "csv_out": "csv", "trigger": "triggers", "target": "targets",
           "method": "search.method", "masks": "search.masks", "window": "search.window",
           "flip_size": "search.flip_size", "force": "decision.force"}
#: parameters that set no config field: the command's own switches, and flags a command accepts like every
#: command's without using them (``poison --device``)
CLI_ONLY = {"config", "json_out", "as_json", "quiet", "device", "settings", "exact"}

runner = CliRunner()


def command(path: tuple[str, ...]) -> Any:
    """The Typer (click) command of ``poisonscan PATH``."""
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def field_of(path: tuple[str, ...], param: Any) -> str | None:
    """The config field a parameter sets (``None`` for the command's own switches such as ``--json``)."""
    fields = flat_defaults(CONFIGS[path])
    if param.name in fields:
        return param.name
    if param.name in ALIASES and ALIASES[param.name] in fields:
        return ALIASES[param.name]
    assert param.name in CLI_ONLY, f"{' '.join(path)}: option {param.opts} sets no field of {CONFIGS[path].__name__}"
    return None


def options(path: tuple[str, ...]) -> list[Any]:
    """The options (not the arguments) of ``poisonscan PATH``."""
    return [p for p in command(path).params if p.param_type_name == "option"]


def parse_number(text: str) -> float:
    """``0.25``, ``1024`` or a fraction ``60/224``."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def matches(text: str, value: Any) -> bool:
    """Whether the written default ``text`` (``0.10``, ``60/224``, ``5, 10, 20``, ``off``) is ``value``."""
    text = text.strip().strip("`").strip()
    if isinstance(value, bool):
        return text == ("on" if value else "off")
    if isinstance(value, (list, tuple)):
        parts = [p for p in re.split(r"\s*,\s*", text) if p]
        return len(parts) == len(value) and all(matches(p, v) for p, v in zip(parts, value))
    if isinstance(value, (int, float)):
        try:
            return math.isclose(parse_number(text), float(value), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return False
    return text == str(value)


def has_value(value: Any) -> bool:
    """A default worth showing: not ``None``, not empty, not a switch's ``False``."""
    return value is not None and value != "" and value != [] and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------- help
def rendered_help(path: tuple[str, ...]) -> dict[str, str]:
    """``--help`` rendered 200 columns wide: option name -> its whole row (names, type, help) on one line."""
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in result.output.splitlines():
        if line.startswith("│ ") and len(line) > 2 and line[2] != " ":
            current = rows.setdefault(line[2:].split()[0], [])
        elif not line.startswith("│"):
            current = None
        if current is not None:
            current.append(line.strip("│ \t"))
    return {name: " ".join(" ".join(parts).split()) for name, parts in rows.items()}


@pytest.mark.parametrize("path", list(CONFIGS), ids="-".join)
def test_help_shows_config_defaults(path: tuple[str, ...]) -> None:
    paths = {(name,) for name in COMMANDS if name != "eval"} | {("eval", name) for name in command(("eval",)).commands}
    assert paths == set(CONFIGS), "a command without its config class here"
    rows = rendered_help(path)
    defaults = flat_defaults(CONFIGS[path])
    problems = []
    for opt in options(path):
        row = rows.get(opt.opts[0])
        assert row is not None, f"{opt.opts[0]} not in the rendered help of {' '.join(path)}"
        if row.endswith(" .") or "[]" in row:
            problems.append(f"{opt.opts[0]}: markup ate the bracketed text: {row!r}")
        if re.search(r"\(default\b|default:|by default", row, re.IGNORECASE):
            problems.append(f"{opt.opts[0]}: default written another way than [VALUE]: {row!r}")
        field = field_of(path, opt)
        if field is None:
            continue
        value = defaults[field]
        shown = re.search(r"\[([^\[\]]*)\]\.?$", row)
        if value == "":
            if "(required" not in row and not shown:
                problems.append(f"{opt.opts[0]}: required setting not marked (required): {row!r}")
        elif has_value(value):
            if not shown or not matches(shown.group(1).split(";")[0], value):
                problems.append(f"{opt.opts[0]}: default {value!r} of {field} not shown at the end: {row!r}")
    assert not problems, "\n".join(problems)


def test_helptext_formats_and_escapes() -> None:
    from poisonscan.cli.helptext import default, described, required

    assert default(DetectConfig, "evidence.null_size") == "[1024]"
    assert default(DetectConfig, "classifier.drop_top") == "[0.1]"
    assert default(DetectConfig, "classifier.refine_by") == "\\[removal]"
    assert default(DetectConfig, "search.window") == "[60/224]"
    assert default(EvalDetectionConfig, "topk") == "[5, 10, 20, 50, 100]"
    assert default(DetectConfig, "classifier.ensemble", "1 = one") == "[3; 1 = one]"
    assert default(CleanConfig, "compress") == "\\[off]"
    assert described("runs/detect/runN") == "\\[runs/detect/runN]"
    assert required("--resume") == "(required unless --resume)"
    with pytest.raises(ValueError):
        default(DetectConfig, "model")
    with pytest.raises(KeyError):
        default(DetectConfig, "no_such_field")


# ----------------------------------------------------------------------------------------------- docs
def split_row(line: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` stays inside a cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def doc_tables(page: Path) -> list[tuple[tuple[str, ...], str, list[list[str]]]]:
    """``(command path, "flag" or "setting", rows)`` of every table of ``page`` with a default column; the rows'
    cells are (names, default)."""
    base: tuple[str, ...] = (page.stem,)
    path = base
    tables = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        heading = re.match(r"#+ .*`(?:poisonscan )?eval (\w+)`", lines[i])
        if heading:
            path = ("eval", heading.group(1))
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"\|[-| :]+\|$", lines[i + 1].strip()):
            header = [c.lower() for c in split_row(lines[i])]
            j = i + 2
            body = []
            while j < len(lines) and lines[j].startswith("|"):
                body.append(split_row(lines[j]))
                j += 1
            if header[0] in ("flag", "setting") and "default" in header:
                col = header.index("default")
                tables.append((path, header[0], [[r[0], r[col] if col < len(r) else ""] for r in body]))
            i = j
            continue
        i += 1
    return tables


def pages() -> dict[tuple[str, ...], Path]:
    """The docs page of every command (``eval.md`` for the three ``eval`` subcommands)."""
    return {path: DOCS / f"{path[0]}.md" for path in CONFIGS}


def flags_in(cell: str) -> list[str]:
    """The flags (``--name``, ``-x``) a table cell names."""
    return re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", cell)


def doc_default_ok(cell: str, value: Any, opt: Any | None) -> bool:
    """Whether a docs default cell agrees with the config default ``value``."""
    text = cell.replace("`", "").strip()
    if value is None or value == []:
        return True                                         # a default the code chooses, described in words
    if value == "":
        return bool(text)                                   # (required ...) or a described default
    lead = re.split(r"\s*[(;]", text)[0].strip() if not text.startswith("(") else text
    if isinstance(value, bool) and opt is not None and lead in (opt.opts + opt.secondary_opts):
        return lead in (opt.opts if value else opt.secondary_opts)
    return matches(lead, value)


def synopsis_commands(page: Path) -> list[tuple[tuple[str, ...], str]]:
    """``(command path, its text)`` of every ``poisonscan ...`` invocation in the page's code blocks (indented
    lines continue the one above)."""
    out: list[tuple[tuple[str, ...], str]] = []
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        text = line.split("  #")[0]
        hit = re.search(r"\bpoisonscan (eval \w+|\w+)(.*)", text)
        if hit:
            out.append((tuple(hit.group(1).split()), hit.group(2)))
        elif line.startswith(" ") and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + text)
        else:
            out.append(((), ""))
    return [(p, t) for p, t in out if p]


def synopsis_problems(path: tuple[str, ...], page: Path) -> list[str]:
    """Commands the page names that do not exist, and flags or ``[--flag VALUE]`` defaults of ``poisonscan PATH``
    in its code blocks that the command does not have."""
    problems = []
    text = page.read_text(encoding="utf-8")
    for name in re.findall(r"`poisonscan (\w+)", text) + [found[0] for found, _ in synopsis_commands(page)]:
        if name not in COMMANDS:
            problems.append(f"{page.name}: poisonscan {name} is not a command")
    by_name = {name: opt for opt in options(path) for name in opt.opts + opt.secondary_opts}
    defaults = flat_defaults(CONFIGS[path])
    for found, args in synopsis_commands(page):
        if found != path:
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
            if flag not in by_name:
                problems.append(f"{page.name}: {flag} is not an option of {' '.join(path)}")
        for flag, value in re.findall(r"\[(--[a-z][\w-]*) ([^\s\]|]+)(?=[\]\s])(?! *\|)", args):
            if flag not in by_name or value[0].isupper():
                continue                                    # placeholders: N, DIR, SPEC
            field = field_of(path, by_name[flag])
            if field and not doc_default_ok(value, defaults[field], by_name[flag]):
                problems.append(f"{page.name}: [{flag} {value}] but {field} defaults to {defaults[field]!r}")
    return problems


@pytest.mark.parametrize("path", list(CONFIGS), ids="-".join)
def test_docs_defaults_match_config(path: tuple[str, ...]) -> None:
    page = pages()[path]
    defaults = flat_defaults(CONFIGS[path])
    by_name = {name: opt for opt in options(path) for name in opt.opts + opt.secondary_opts}
    params = command(path).params
    set_by_flag = {field_of(path, p) for p in params} - {None}
    documented: set[str] = set()
    config_only: set[str] = set()
    problems = []
    tables = [t for t in doc_tables(page) if t[0] == path]
    assert any(kind == "flag" for _, kind, _ in tables), f"{page.name}: no | flag | default | meaning | table for " \
                                                         f"{' '.join(path)}"
    for _, kind, rows in tables:
        for names, cell in rows:
            if kind == "setting":
                for name in re.findall(r"`([\w.]+)`", names):
                    if name not in defaults:
                        problems.append(f"{page.name}: setting {name} is not a field of {CONFIGS[path].__name__}")
                    elif name in set_by_flag:
                        problems.append(f"{page.name}: setting {name} has a flag; document it as one")
                    elif not doc_default_ok(cell, defaults[name], None):
                        problems.append(f"{page.name}: {name} default {cell!r}, config {defaults[name]!r}")
                    config_only.add(name)
                continue
            found = []
            for flag in flags_in(names):
                if flag not in by_name:
                    problems.append(f"{page.name}: {flag} is not an option of {' '.join(path)}")
                elif by_name[flag] not in found:
                    found.append(by_name[flag])
            parts = [p.strip() for p in re.split(r",\s+(?![^(]*\))", cell)]
            for k, opt in enumerate(found):
                documented.update(opt.opts)
                field = field_of(path, opt)
                if field is None:
                    continue
                own = parts[k] if len(found) > 1 and len(parts) == len(found) else cell
                if not doc_default_ok(own, defaults[field], opt):
                    problems.append(f"{page.name}: {opt.opts[0]} default {own!r}, config {field} = "
                                    f"{defaults[field]!r}")
    for opt in options(path):
        if not set(opt.opts) & documented:
            problems.append(f"{page.name}: {opt.opts[0]} of {' '.join(path)} has no row in a flag table")
    for name in sorted(set(defaults) - set_by_flag - config_only):
        problems.append(f"{page.name}: config-only setting {name} of {' '.join(path)} has no row in a setting table")
    problems += synopsis_problems(path, page)
    assert not problems, "\n".join(problems)


