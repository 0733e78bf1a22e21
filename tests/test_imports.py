"""The package's import graph: no module imports itself back, at import time or at all.

Modules are parsed with :mod:`ast`, never imported, so a cycle is reported as a
path of module names instead of surfacing as a half-initialised module
somewhere else. Three graphs, each containing the one before, must be acyclic:

* **import time**: imports that run when a module is imported (module top level,
  class bodies, ``try``/``if``/``with`` blocks), excluding ``if TYPE_CHECKING:``;
* **with type checking**: plus the imports under ``if TYPE_CHECKING:`` (a loop
  that only annotations close still ties two modules' designs together);
* **any time**: plus imports inside functions and the entries of lazy registries
  (``"editkit.editors.rome:ROME"``), which import their module on first use
  (deferred imports only hide a loop until the function runs).

Edges: ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) point at
``a.b.c``; ``from a.b import name`` (``name`` not a submodule) points at ``a.b``.
Importing a module also runs its ancestor packages' ``__init__``, so those are
edges too, except packages that contain the importing module (they are already
initialising when it runs: a child importing from its own package is the usual
``pkg/__init__`` -> ``pkg.child`` pattern, not a loop, unless it names the
package explicitly).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "editkit"
LAZY = re.compile(rf"{PACKAGE}(\.\w+)+:\w+")  # "editkit.editors.rome:ROME", as editkit's lazy registries write them


def _modules() -> dict[str, Path]:
    """Dotted module name -> source path, for every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, *, in_functions: bool, type_checking: bool = False
             ) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements of ``tree`` that run at import time (or also inside functions)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if in_functions:
                yield from _imports(node, in_functions=True, type_checking=type_checking)
        elif isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:  # the `else:` of `if TYPE_CHECKING:` runs
                yield from _imports(ast.Module(body=[child], type_ignores=[]), in_functions=in_functions)
        else:
            yield from _imports(node, in_functions=in_functions, type_checking=type_checking)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules that ``node``, written in ``module``, names directly."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    submodules = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    named = {alias.name for alias in node.names if f"{base}.{alias.name}" not in MODULES}
    return submodules | ({base} if named or not submodules else set())


def _edges(module: str, target: str) -> set[str]:
    """``target`` (its longest existing module prefix) and the ancestor packages its import runs."""
    parts = target.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    if not parts or parts[0] != PACKAGE:
        return set()
    found = {".".join(parts)}
    for end in range(1, len(parts)):
        ancestor = ".".join(parts[:end])
        if not (module == ancestor or module.startswith(ancestor + ".")):
            found.add(ancestor)
    return found


def import_graph(*, in_functions: bool, type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in _imports(tree, in_functions=in_functions, type_checking=type_checking):
            for target in _targets(module, node):
                targets |= _edges(module, target)
        if in_functions:  # a lazy registry imports its entries on first use
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY.fullmatch(node.value):
                    targets |= _edges(module, node.value.partition(":")[0])
        graph[module] = targets - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

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
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the smallest member of ``component`` (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if successor not in parents:
                    parents[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_cycles_and_package_edges() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert _edges("editkit.editors.grace", "editkit.benchmarks.passes") == {
        "editkit.benchmarks.passes", "editkit.benchmarks"}
    assert _edges("editkit.benchmarks.engine", "editkit.benchmarks.passes") == {"editkit.benchmarks.passes"}
    assert _edges("editkit.benchmarks.engine", "editkit.benchmarks") == {"editkit.benchmarks"}
    assert _edges("editkit.benchmarks.engine", "torch") == set()
    graph = import_graph(in_functions=False)
    assert "editkit.benchmarks.engine" in graph["editkit.benchmarks"], "pkg/__init__ -> pkg.child"
    assert "editkit.benchmarks" not in graph["editkit.benchmarks.engine"], "a child runs inside its package"
    assert "editkit.editors.rome" not in graph["editkit.editors"]
    assert "editkit.editors.rome" in import_graph(in_functions=True)["editkit.editors"], "lazy registry entry"


def test_no_import_cycle_at_import_time() -> None:
    cycles = find_cycles(import_graph(in_functions=False))
    assert not cycles, f"module-level import cycles (excluding `if TYPE_CHECKING:`):\n{_describe(cycles)}"


def test_no_import_cycle_counting_type_checking_imports() -> None:
    """A loop that only type annotations close still ties the modules' designs together."""
    cycles = find_cycles(import_graph(in_functions=False, type_checking=True))
    assert not cycles, f"import cycles counting `if TYPE_CHECKING:` imports:\n{_describe(cycles)}"


def test_no_import_cycle_counting_deferred_imports() -> None:
    """Imports inside functions and lazy registry entries (``"editkit.x:Name"``) counted too."""
    cycles = find_cycles(import_graph(in_functions=True, type_checking=True))
    assert not cycles, f"import cycles counting imports inside functions and lazy registries:\n{_describe(cycles)}"


def test_training_depends_on_no_editor() -> None:
    """editors.mend/serac import editkit.training, so training must not reach back into editkit.editors."""
    graph = import_graph(in_functions=True, type_checking=True)
    reached = sorted(t for t in graph["editkit.training"] if t == "editkit.editors" or t.startswith("editkit.editors."))
    assert not reached, f"editkit.training imports {reached}"


def test_engine_internals_stay_inside_the_benchmarks_package() -> None:
    internal = {"editkit.benchmarks.passes", "editkit.benchmarks.generation"}
    graph = import_graph(in_functions=True, type_checking=True)
    outside = sorted((m, t) for m, targets in graph.items() if not m.startswith("editkit.benchmarks")
                     for t in targets & internal)
    assert not outside, f"modules outside editkit.benchmarks import its engine internals: {outside}"
