"""The house rules a newcomer can rely on: no module of deployments/ over 400 lines, no function over 50, and the
request path's decisions in a module that imports neither Serve nor FastAPI."""

from __future__ import annotations

import ast
from pathlib import Path

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "deployments"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 50


def _modules():
    return sorted(DEPLOYMENTS.rglob("*.py"))


def test_no_module_over_400_lines():
    sizes = {str(p.relative_to(DEPLOYMENTS)): p.read_text().count("\n") for p in _modules()}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_50_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and n > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(DEPLOYMENTS)}:{node.name}"] = n
    assert not long, long


def test_the_orchestrator_imports_neither_serve_nor_fastapi():
    tree = ast.parse((DEPLOYMENTS / "api" / "orchestrator.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("ray", "fastapi", "starlette"))}, imported
