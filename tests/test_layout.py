"""The package's layout as the design states it: abc_jax's import graph has no cycle (imports
inside functions included), the compiled loop knows no training method, and the library
holds no process code (signals, exit codes)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "abc_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The abc_jax modules ``path`` imports, anywhere in it (``from abc_jax.x import y`` is x,
    or x.y where that is a module)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                      else node.module for a in node.names}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_import_graph_has_no_cycle():
    edges = {m: {d for d in deps if d != m and not m.startswith(d + ".")}  # a package's own
             for m, deps in graph().items()}                             # __init__ aside
    done, visiting = set(), []

    def visit(m: str) -> None:
        assert m not in visiting, f"import cycle: {' -> '.join([*visiting, m])}"
        if m in done:
            return
        visiting.append(m)
        for d in sorted(edges.get(m, ())):
            if d != "abc_jax" and not d.startswith(m + "."):
                visit(d)
        visiting.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)
    assert "abc_jax.engine.train" in done and len(done) >= 20


def test_the_loop_and_the_front_end_know_no_training_method():
    g = graph()
    methods = {"abc_jax.engine.privacy", "abc_jax.engine.second_order", "abc_jax.engine.steps"}
    assert not g["abc_jax.engine.loop"] & methods and not g["abc_jax.engine.pipeline"] & methods
    tree = ast.parse((PACKAGE / "engine" / "loop.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    assert not names & {"batch_size", "privacy", "optimizer", "grad", "update", "private"}


def test_no_process_code_in_the_library():
    for path in PACKAGE.rglob("*.py"):
        names = {a.name for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        names |= {n.module for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"signal"}, path
        assert "os._exit" not in path.read_text() and "sys.exit" not in path.read_text(), path
