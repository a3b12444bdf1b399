"""The package's shape: the pipeline's layers import one way, modules keep their private names, functions
stay short, and ruff is clean. Read from the source (ast), so lazy imports inside functions count too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mergekit_evolve"
MAX_FUNCTION_LINES = 60
# A layer may import its own and the layers listed before it, never one after it (the pipeline's direction).
# fitness and zoo stand alone (they know nothing of merging); config gathers every part's settings.
LAYERS = [
    {"errors", "progress", "atomic", "migration", "torch_extensions"},
    {"fitness", "modeling", "zoo"},
    {"config", "space", "resources"},
    {"recipe", "merge"},
    {"search"},
    {"export"},
    {"runner"},
    {"demo"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def imports_of(name: str) -> list[tuple[str, str]]:
    """(module imported, name imported from it or '') for every import in a module, at any depth."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, "") if submodule in MODULES else (base, alias.name))
    return [(module, item) for module, item in found if module in MODULES and module != name]


def import_graph() -> dict[str, set[str]]:
    return {name: {module for module, _ in imports_of(name)} for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, layer in enumerate(LAYERS) if top in layer), -1)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_layers_import_only_earlier_layers():
    assert all(layer_of(m) >= 0 for m in MODULES if m != "mergekit_evolve"), "every package has a layer"
    backwards = [
        (m, dep)
        for m, deps in import_graph().items()
        if m != "mergekit_evolve"
        for dep in deps
        if dep != "mergekit_evolve" and layer_of(dep) > layer_of(m)
    ]
    assert backwards == []


def test_no_private_name_imported_across_modules():
    private = [
        (m, f"{module}.{item}")
        for m in MODULES
        for module, item in imports_of(m)
        if item.startswith("_") and not item.startswith("__")
    ]
    assert private == []


def test_click_commands_only_in_cli():
    users = [
        m
        for m, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "click"
        and node.attr in ("command", "group", "option", "argument")
        and m != "mergekit_evolve.cli"
    ]
    assert users == []


def test_no_function_longer_than_60_lines():
    long = [
        (m, node.name, node.end_lineno - node.lineno + 1)
        for m, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_ruff_is_clean():  # ruff comes with the test extra
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "mergekit_evolve", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
