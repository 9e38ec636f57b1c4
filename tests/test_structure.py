"""The house rules, checked from the code's own imports and definitions (ast, nothing imported):
no import circle between modules of serve_pruned/, nothing in the torch-free model description
(serve_pruned/model/) or in serving/ imports compress/, and no function longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "serve_pruned"
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the serve_pruned modules it imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name.startswith("serve_pruned")}
            elif (isinstance(node, ast.ImportFrom) and node.level == 0
                  and (node.module or "").startswith("serve_pruned")):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    edges[name].add(full if full in mods else str(node.module))
    return {m: {t for t in ts if t in mods and t != m} for m, ts in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def long_functions() -> list[tuple[int, str]]:
    rows = []
    for name, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(rows, reverse=True)


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_compress_imports_it():
    below = ("serve_pruned.model", "serve_pruned.serving")
    upward = [f"{m} -> {t}" for m, ts in import_graph().items() if m.startswith(below)
              for t in ts if t.startswith("serve_pruned.compress")]
    assert upward == []


def test_no_function_over_80_lines():
    assert [r for r in long_functions() if r[0] > MAX_LINES] == []
