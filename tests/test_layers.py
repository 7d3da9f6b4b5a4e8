"""The layers point one way: contract <- datamodules <- modules <- pipelines, the team server apart, no
file importing another that imports it back. Read from the source (every import statement, also the
ones inside functions and under `if TYPE_CHECKING:`), so a new back edge fails here before it hides in
a late import or an annotation."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; server sits apart (it may import none of the others, nor they it: see the pairs below)
PACKAGES = ("contract", "datamodules", "modules", "pipelines", "server")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Dotted names a file imports, anywhere: an import under `if TYPE_CHECKING:` is still a dependency
    (two files that need each other's names, even for annotations only, belong together or apart)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {n for n in _imports(p) if n in files and n != name} for name, p in files.items()}


def test_graph_sees_the_packages():
    g = graph()
    assert "pipelines.run" in g and "modules.gpt.model" in g
    assert "pipelines.session" in g["pipelines.run"]  # edges are found


def test_imports_under_type_checking_count(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from modules.gpt.model import GPTConfig\n")
    assert "modules.gpt.model" in _imports(f)


@pytest.mark.parametrize("low,high", [("modules", "pipelines"), ("datamodules", "pipelines"), ("datamodules", "modules"),
                                      ("modules", "server"), ("datamodules", "server"), ("pipelines", "server"),
                                      *[("contract", p) for p in PACKAGES[1:]]])
def test_lower_layers_import_nothing_above(low, high):
    bad = {(a, b) for a, deps in graph().items() if a.split(".")[0] == low for b in deps if b.split(".")[0] == high}
    assert not bad, f"{low} must not import {high}: {sorted(bad)}"


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                cycles.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    assert not cycles, f"files that import each other (directly or through others): {cycles}"
