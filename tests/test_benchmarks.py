"""The benchmarks name only what tunefleet has: they run for minutes, outside the suite, so a renamed function
they call breaks them unseen (both serve benchmarks called serving.server._wait_for_signal for two sessions after it
was gone, and failed after their first server started)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from testdata import REPO

FIRST_PARTY = ("cluster", "training", "serving", "common")
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}" if name == "common" else name)


def _references(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for each `from M import a` and each `alias.a` of `import M as alias`."""
    found: list[tuple[str, str, int]] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FIRST_PARTY:
            found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FIRST_PARTY and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_tunefleet_name_a_benchmark_uses_exists(script: Path) -> None:
    missing = []
    for module, attribute, line in _references(ast.parse(script.read_text())):
        target = _module(module)
        submodule = hasattr(target, "__path__") and importlib.util.find_spec(f"{target.__name__}.{attribute}")
        if not hasattr(target, attribute) and not submodule:
            missing.append(f"{script.name}:{line}: {module}.{attribute}")
    assert not missing, missing


def test_the_check_sees_a_missing_name() -> None:
    tree = ast.parse("import serving.server as server_mod\nserver_mod._wait_for_signal()\n"
                     "from serving.server import start_server\n")
    refs = _references(tree)
    assert ("serving.server", "_wait_for_signal", 2) in refs and ("serving.server", "start_server", 3) in refs
    assert not hasattr(_module("serving.server"), "_wait_for_signal")
