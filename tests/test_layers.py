"""The layers point one way: datamodules <- modules <- pipelines, the team server apart, no file
importing another that imports it back. Read from the source (every import statement, also the
ones inside functions), so a new back edge fails here before it hides in a late import."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "modules", "pipelines", "server")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Dotted names a file imports at run time (imports under `if TYPE_CHECKING:` are for annotations only)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


@pytest.mark.parametrize("low,high", [("modules", "pipelines"), ("datamodules", "pipelines"), ("datamodules", "modules"),
                                      ("modules", "server"), ("datamodules", "server"), ("pipelines", "server")])
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
