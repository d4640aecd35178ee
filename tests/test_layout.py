"""The package's layout: no module imports one that imports it back, and a module over 400 lines says why."""

from __future__ import annotations

import ast
from pathlib import Path

import poisonscan

ROOT = Path(poisonscan.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, known: set[str], self_name: str) -> set[str]:
    """The package modules ``path`` imports (anywhere in the file; a parent package, and the package root that only
    re-exports lazily, excluded)."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("poisonscan"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("poisonscan")]
        deps |= {n for n in names if n in known}
    return {d for d in deps if d != self_name and d != "poisonscan" and not self_name.startswith(d + ".")}


def test_no_module_imports_one_that_imports_it_back() -> None:
    mods = _modules()
    graph = {name: _imports(path, set(mods), name) for name, path in mods.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_a_module_over_400_lines_states_why_in_its_docstring() -> None:
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        doc = " ".join((ast.get_docstring(ast.parse(text)) or "").split())
        if text.count("\n") > 400 and "Its length is" not in doc:
            long.append(name)
    assert not long, long
