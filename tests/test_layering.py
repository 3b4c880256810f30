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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the dsm_tune modules it imports, lazy imports included. `from pkg import name` imports the
    submodule `pkg.name` when there is one; importing a module runs its packages' `__init__` first, except the
    importer's own packages (they are already being imported)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if module in packages else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names
                               if f"{source}.{alias.name}" in paths)
        edges: set[str] = set()
        for target in targets:
            if target not in paths:
                continue
            edges.update(a for a in _ancestors(target) + [target] if a not in _ancestors(module) and a != module)
        graph[module] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circles():
    """Any circle of imports inside the package, lazy ones included: each hides an order dependency."""
    circles = _circles(_import_graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def test_the_circle_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [{"a", "b", "c"}]


def test_the_circle_check_finds_a_circle():
    graph = _import_graph()
    graph["dsm_tune.merging.config"] = graph["dsm_tune.merging.config"] | {"dsm_tune.search.study.driver"}
    assert any({"dsm_tune.merging.config", "dsm_tune.search.study.driver"} <= circle for circle in _circles(graph))


def test_the_study_uses_strategies_and_no_strategy_knows_the_study():
    """Changing the search strategy touches `search/strategies/` alone: the study's loop sees only the proposal
    contract, and a strategy never reaches into the driver (nor through the package `__init__` it would run)."""
    graph = _import_graph()
    strategies = [m for m in graph if m.startswith("dsm_tune.search.strategies")]
    for module in strategies:
        into_study = sorted(m for m in graph[module] if m.startswith("dsm_tune.search.study"))
        assert not into_study, f"{module} imports {into_study}"
    assert any(m.startswith("dsm_tune.search.strategies") for m in graph["dsm_tune.search.study.loop"])


MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 50


def _oversized(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            kind, bound = f"class {node.name}", MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind, bound = f"{node.name}()", MAX_FUNCTION_LINES
        else:
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > bound:
            found.append(f"{where}: {kind} has {lines} lines")
    return found


def test_search_classes_and_functions_stay_small():
    """A class that outgrows 200 lines or a function 50 in `search/` has taken on a second concern: split it."""
    found = [line for path in sorted((PACKAGE / "search").rglob("*.py"))
             for line in _oversized(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert not found, "; ".join(found)


def test_the_size_check_sees_a_long_function_and_a_long_class():
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    long_class = "class C:\n" + "    x = 1\n" * MAX_CLASS_LINES
    short = "def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    assert _oversized(long_function, "a.py") == [f"a.py: f() has {MAX_FUNCTION_LINES + 1} lines"]
    assert _oversized(long_class, "b.py") == [f"b.py: class C has {MAX_CLASS_LINES + 1} lines"]
    assert _oversized(short, "c.py") == []


@pytest.mark.parametrize("name", ["seed_kind", "accuracy_drop"])
def test_trial_attributes_are_spelled_only_in_the_record_schema(name):
    """Every module names a trial attribute through `dsm_tune/record.py`, so a rename is one edit."""
    spelled = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if path != PACKAGE / "record.py" and f'"{name}"' in path.read_text()]
    assert not spelled, f'"{name}" spelled out in {spelled}'
