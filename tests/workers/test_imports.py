"""The workers' imports form no loop, counting those inside functions, and delivery needs neither Celery nor
the HTTP client package."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "workers"


def imported_modules(path: Path) -> set[str]:
    """Every `workers.*` module that `path` imports anywhere (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from workers import steps`
    modules = {f"workers.{p.stem}" for p in WORKERS.glob("*.py") if p.stem != "__init__"}
    return found & modules


def test_the_workers_import_graph_has_no_cycle() -> None:
    graph = {f"workers.{path.stem}": imported_modules(path) for path in WORKERS.glob("*.py") if path.stem != "__init__"}
    assert graph["workers.reaper"].isdisjoint({"workers.webhooks", "workers.celery_app"})
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a loop
    assert order.index("workers.callbacks") < order.index("workers.webhooks") < order.index("workers.tasks")


def test_each_module_imports_alone_and_delivery_needs_no_celery_nor_client() -> None:
    code = (
        "import importlib, sys\n"
        "for name in ('workers.callbacks', 'workers.webhooks', 'workers.reaper', 'eigenshift.signing'):\n"
        "    importlib.import_module(name)\n"
        "assert 'celery' not in sys.modules, 'celery'\n"
        "assert 'eigenshift.client' not in sys.modules, 'eigenshift.client'\n"
        "from workers.webhooks import queue_notification\n"  # still importable from its old home
        "from workers.celery_app import queue_notification as queued\n"
        "assert queue_notification is queued\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # Each module of the former loop first, in its own interpreter: a loop shows as an ImportError on a
    # partly built module (the static check above covers every module).
    for name in ("workers.webhooks", "workers.reaper", "workers.celery_app"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, (name, result.stderr[-2000:])
