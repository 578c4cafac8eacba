"""One request path, one direction: the HTTP layer uses only the Engine's public API; the worker holds a
pipeline and never reaches back up (Engine -> executor -> worker -> pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

import diffgen

ROOT = Path(diffgen.__file__).parent


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every diffgen module a file imports, at any depth (function-level imports included); names
    imported from a package count as modules when they are modules (``from diffgen.engine import worker``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
    return names


def test_the_http_layer_uses_only_the_engine_public_api():
    internals = ("diffgen.engine.", "diffgen.pipelines", "diffgen.loader", "diffgen.models")
    for path in sorted((ROOT / "entrypoints" / "http").glob("*.py")):
        reached = sorted(name for name in _imports(path) if name.startswith(internals))
        assert not reached, f"{path.name} imports engine internals: {reached}"


def test_the_worker_holds_a_pipeline_and_never_reaches_back_up():
    reached = _imports(ROOT / "engine" / "worker.py")
    assert not [n for n in reached if n.startswith("diffgen.entrypoints")]
    assert not [n for n in reached if n.startswith(("diffgen.engine.engine", "diffgen.engine.scheduler"))]
    imported_names = {alias.name for node in ast.walk(ast.parse((ROOT / "engine" / "worker.py").read_text()))
                      if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "Engine" not in imported_names and "load_model" in imported_names


def test_messages_between_processes_are_typed_records():
    import dataclasses

    from diffgen.engine import messages

    records = [obj for obj in vars(messages).values() if isinstance(obj, type) and obj.__module__ == messages.__name__]
    assert len(records) >= 10 and all(dataclasses.is_dataclass(r) for r in records)
    source = (ROOT / "engine" / "worker.py").read_text() + (ROOT / "engine" / "scheduler.py").read_text()
    assert ".put((" not in source  # no positional tuples on the queues


def test_every_entry_point_goes_through_the_engine():
    cli = _imports(ROOT / "entrypoints" / "cli.py") | _imports(ROOT / "entrypoints" / "serve.py")
    assert not [n for n in cli if n.startswith(("diffgen.pipelines", "diffgen.engine.scheduler",
                                                "diffgen.engine.worker", "diffgen.loader"))]
