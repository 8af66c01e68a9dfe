"""The package's structure (issue "one place per op family"): no import cycle between fastvit's modules, at module
level or deferred inside functions; the registry imports no backend; every dispatched op is declared by exactly one
family module and has a public function in fastvit.ops; the triton backend's ops are those of the families."""

from __future__ import annotations

import ast
import os

import fastvit
from fastvit import backends, families, ops

ROOT = os.path.dirname(fastvit.__file__)


def _modules() -> dict[str, str]:
    """fastvit module name -> file, for every .py under fastvit/ (fastvit.kernels lives in kernels/: excluded)."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, name)
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """Every fastvit module ``module`` imports anywhere in its file (function bodies included)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != module}
    return out


def test_no_import_cycle_in_the_package():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) - {"fastvit"} for m, p in mods.items()}  # the root package imports all
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_registry_imports_no_backend_and_no_family():
    mods = _modules()
    assert _imports("fastvit.backends", mods["fastvit.backends"], set(mods)) == set()


def test_every_op_is_declared_once_and_public():
    assert len(set(backends.OPS)) == len(backends.OPS)
    assert set(backends.FAMILY_OF) == set(backends.OPS)
    for name in backends.OPS:
        family = getattr(families, backends.FAMILY_OF[name])
        assert name in family.OPS
        assert name in ops.__all__ and callable(getattr(ops, name))
        assert name in backends.get_backend("eager").kernels
    dispatched = {n for n in ops.__all__ if n not in ("random_masking", "describe_call")}
    assert dispatched == set(backends.OPS)
