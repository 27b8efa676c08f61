"""Import hygiene of the loss modules: no private name crosses a module, nothing of distill outside
distill.losses is imported, no import sits below a definition, the registry needs only the standard library,
and the loss modules import each other without a cycle."""
from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest

import distill.losses as losses

LOSSES_DIR = Path(losses.__file__).parent


def _module_imports(path: Path) -> list[tuple[str, list[str], int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
    return found


LOSS_MODULES = sorted(LOSSES_DIR.glob("*.py"))


@pytest.mark.parametrize("path", LOSS_MODULES, ids=[path.stem for path in LOSS_MODULES])
def test_loss_modules_import_no_private_name_nothing_else_of_distill_and_nothing_late(path):
    tree = ast.parse(path.read_text())
    first_definition = next((node.lineno for node in tree.body
                             if isinstance(node, (ast.FunctionDef, ast.ClassDef))), math.inf)
    allowed = set(sys.stdlib_module_names) | {"torch", "distill"}
    for module, names, line in _module_imports(path):
        assert line < first_definition, f"{path.name}:{line}: import below a definition"
        assert module.split(".")[0] in allowed, f"{path.name}: imports {module}"
        if module.startswith("distill"):
            assert module == "distill.losses" or module.startswith("distill.losses."), f"{path.name}: {module}"
            private = [name for name in names if name.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {module}"
    # nested imports (inside functions) count too
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill"):
            assert not [alias.name for alias in node.names if alias.name.startswith("_")]


def test_registry_imports_only_the_standard_library():
    for module, _, _ in _module_imports(LOSSES_DIR / "registry.py"):
        assert module.split(".")[0] in sys.stdlib_module_names or module == "__future__", module


def test_no_import_cycle_between_loss_modules():
    graph = {}
    for path in LOSS_MODULES:
        if path.stem == "__init__":
            continue
        graph[path.stem] = {module.rsplit(".", 1)[-1] for module, _, _ in _module_imports(path)
                            if module.startswith("distill.losses.")}
        graph[path.stem] |= {name for module, names, _ in _module_imports(path) if module == "distill.losses"
                             for name in names}
    visiting, done = set(), set()

    def visit(node, trail):
        assert node not in visiting, f"import cycle: {' -> '.join(trail + [node])}"
        if node in done:
            return
        visiting.add(node)
        for child in graph.get(node, ()):
            visit(child, trail + [node])
        visiting.discard(node)
        done.add(node)

    for module in graph:
        visit(module, [])
