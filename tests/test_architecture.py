"""The import rules of the house (docs/architecture.md), read from every module's imports (AST, lazy
imports inside functions included; `if TYPE_CHECKING:` imports, which never run, left out):

    distill.losses      imports torch, the standard library and itself: pure functions over tensors
    distill.core        imports itself and third-party libraries, never a family
    a family            (lm, classifier, diffusion) imports core, losses and itself, plus the exceptions
                        declared below with their reason
    the package root    (distill/__init__, cli, __main__, errors) is the application: it may import anything
    nowhere             is a `_private` name imported from another module, and no two modules import each
                        other (directly or round a longer loop)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
FAMILIES = ("lm", "classifier", "diffusion")
ROOT_MODULES = {"distill", "distill.cli", "distill.__main__", "distill.errors"}
# (importing module, imported module): why the rule bends there.
EXCEPTIONS = {
    ("distill.diffusion.data", "distill.classifier.data"):
        "the digits diffusion task trains on the classifier family's digits images",
    ("distill.diffusion.data", "distill.classifier.models"):
        "the digits diffusion task scores samples with the classifier family's digits teacher (its features)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for statement in block.body for node in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # `if TYPE_CHECKING:` imports never run: annotations only
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    if module in ROOT_MODULES:
        return "root"
    return module.split(".")[1]


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The distill modules an import statement reads: `from distill.lm import run` names a submodule."""
    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return submodules or ([target] if target in modules else [])


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in modules.items():
        where = layer(module)
        for target, names, line in imports(path):
            at = f"{path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path}:{line}"
            top = target.split(".")[0]
            if top != "distill":
                if where == "losses" and top not in ("torch", "__future__") and top not in sys.stdlib_module_names:
                    found.append(f"{at}: distill.losses imports `{target}` (only torch and the standard library)")
                continue
            for imported in resolve(target, names, modules) or [target]:
                theirs = layer(imported) if imported != "distill" else "root"
                if (module, imported) in EXCEPTIONS or where == "root":
                    continue
                allowed = {"losses": {"losses"}, "core": {"core"}}.get(where, {"core", "losses", where})
                if theirs not in allowed:
                    found.append(f"{at}: {module} ({where}) imports {imported} ({theirs}); "
                                 f"{where} may import {', '.join(sorted(allowed))}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{at}: {module} imports private {', '.join(private)} from {target}")
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target, names, _ in imports(path):
            targets.update(resolve(target, names, modules))
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one an import loop."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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


def test_every_module_keeps_the_import_rules():
    modules = all_modules()
    assert {"distill.core.run", "distill.losses.registry", "distill.lm.run", "distill.classifier.run",
            "distill.diffusion.run"} <= modules.keys()  # the walk sees the house
    problems = violations(modules)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    # The package roots of the families (distill/lm/__init__ ...) import their run modules lazily, and those
    # import back only submodules: the root package `distill` is left out (it registers every family).
    graph = import_graph({m: p for m, p in all_modules().items() if m not in ROOT_MODULES})
    assert not cycles(graph), cycles(graph)


def test_declared_exceptions_are_still_needed():
    modules = all_modules()
    used = {(module, imported) for module, path in modules.items() for target, names, _ in imports(path)
            for imported in resolve(target, names, modules)}
    assert set(EXCEPTIONS) <= used, set(EXCEPTIONS) - used


@pytest.mark.parametrize("source, expected", [
    ("from distill.lm.models import load_tokenizer\n", "distill.core.io (core) imports distill.lm.models (lm)"),
    ("def f():\n    from distill.classifier.run import prepare\n", "imports distill.classifier.run (classifier)"),
    ("import numpy\n", None),  # core may use third-party libraries
    ("from distill.core.recipe import _fields_at\n", "imports private _fields_at"),
])
def test_the_rules_catch_a_violation(tmp_path, monkeypatch, source, expected):
    # The check itself, on a copy of core/io.py with one import added (the real tree is not touched).
    modules = all_modules()
    mutated = tmp_path / "io.py"
    mutated.write_text(modules["distill.core.io"].read_text() + "\n" + source)
    monkeypatch.setattr(sys.modules[__name__], "module_name",
                        lambda path, original=module_name: "distill.core.io" if path == mutated else original(path))
    problems = violations({**modules, "distill.core.io": mutated})
    if expected is None:
        assert not problems
    else:
        assert any(expected in problem for problem in problems), problems


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_family_loads_only_what_it_needs(tmp_path):
    # The registry imports a family's package on first use: a classifier run never imports transformers
    # (nor any LM module), and naming a family imports no torch at all.
    import subprocess

    recipe = {"task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
              "student": {"arch": "mlp", "options": {"hidden": [8]}},
              "data": {"builtin": "digits", "eval_size": 100, "train_size": 200},
              "train": {"epochs": 0.2, "baseline": False}, "output": str(tmp_path / "run")}
    code = ("import sys, distill\n"
            "from distill.core.families import get_family\n"
            "[get_family(task) for task in ('lm', 'classifier', 'diffusion')]\n"
            "assert 'torch' not in sys.modules\n"
            f"distill.run({recipe!r})\n"
            "loaded = [m for m in sys.modules if m.startswith(('transformers', 'accelerate', 'distill.lm.'))]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
