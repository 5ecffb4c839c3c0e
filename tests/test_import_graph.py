"""The module import graph of memory/, engine/, deployments/ and loadtest/, built from the source with `ast`
(every import: at the top, under `if TYPE_CHECKING:`, inside functions). It has no cycle, and its layers
point one way: loadtest -> deployments -> engine -> memory. Only deployments/ (and loadtest/) import Ray.
No module registers a variant in another package's registry when imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memory", "engine", "deployments", "loadtest")
LAYER = {"memory": 0, "engine": 1, "deployments": 2, "loadtest": 3}  # a module imports only lower layers
REGISTRARS = {"register_layout", "register_policy", "register_backend"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _parse(source: str) -> ast.Module:
    """ast.parse, again after CPython 3.11's "AST constructor recursion depth mismatch" (a SystemError from a race
    on the interpreter's AST recursion counter with another thread that compiles; seen once in a full CI run)."""
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports (a `from package import name` imports package.name if that is a module)."""
    found = set()
    for node in ast.walk(_parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(module, path, known):
            # importing a.b.c also runs a/__init__ and a/b/__init__: the edge goes to the deepest known module
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_the_graph_sees_type_only_and_function_level_imports():
    graph = _graph()
    assert "engine.parallel.executor" in graph["engine.core.runner"]  # under TYPE_CHECKING
    assert "engine.core.engine" in graph["deployments.server"] or "engine.async_engine" in graph["deployments.server"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_layers_point_one_way():
    wrong = sorted((module, target) for module, targets in _graph().items() for target in targets
                   if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]])
    assert wrong == []


def test_only_deployments_and_loadtest_import_ray():
    modules = _modules()
    known = set(modules)
    users = sorted(module for module, path in modules.items()
                   if any(name == "ray" or name.startswith("ray.") for name in _imports(module, path, known)))
    assert users and all(module.split(".")[0] in ("deployments", "loadtest") for module in users), users


def test_no_module_registers_a_variant_when_imported_outside_its_own_package():
    """memory/ registers its own variants (backends, pool policies, KV layouts) at import; a layer above
    registers its variants explicitly, in a function, when it needs them."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith("memory"):
            continue
        for statement in ast.parse(path.read_text()).body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if name in REGISTRARS:
                        offenders.append((module, name))
    assert offenders == []
