"""Deployment teams import only the runtime merger: it must not drag in the tuner's heavy dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dsm_tune.cli import TUNE_EXTRA_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "dsm_tune"
# The `tune` extra: a runtime-only install (the base dependencies) lacks every one of them.
TUNER_ONLY = TUNE_EXTRA_MODULES


@pytest.mark.parametrize("module", ["dsm_tune.merging", "dsm_tune.evaluation"])
def test_runtime_layers_do_not_import_tuner_dependencies(module):
    probe = (f"import sys, importlib; importlib.import_module({module!r}); "
             f"print(','.join(m for m in {TUNER_ONLY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"{module} imports {loaded}"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer, forbidden", [
    ("merging", ("dsm_tune.evaluation", "dsm_tune.search", "dsm_tune.cli", "dsm_tune.commands") + TUNER_ONLY),
    ("evaluation", ("dsm_tune.search", "dsm_tune.cli", "dsm_tune.commands") + TUNER_ONLY),
])
def test_imports_point_one_way(layer, forbidden):
    """Even lazy imports inside functions: cli -> search -> evaluation -> merging, never back."""
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imported_modules(path):
            assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path.name} imports {name}"
