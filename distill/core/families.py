"""The family registry: which package handles a recipe's `task:`.

A model family (causal LMs, classifiers, diffusion denoisers) is a package that defines a `FAMILY`
object, an instance of a `Family` subclass. The package root registers each family by module path
(`register_family("classifier", "distill.classifier")`), and the module is imported only when its
task is asked for: a classifier run never imports transformers, and core never imports a family.

Every family runs through the same skeleton (`core.run.run_recipe`): check the run directory ->
`family.prepare(recipe, run_dir)` (load and check everything; nothing written) -> the run directory
is started (recipe.yaml) -> `job.run(run_dir)` trains and evaluates -> one report writer.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.core.errors import DistillError

if TYPE_CHECKING:
    from distill.core.recipe import RunRecipe
    from distill.core.rundir import RunDirectory, RunResult

DEFAULT_TASK = "lm"  # a recipe without `task:` is a causal-LM recipe
_MODULES: dict[str, str] = {}  # task -> module path, in registration order
_LOADED: dict[str, "Family"] = {}


class Job:
    """One prepared run of a family: everything loaded and checked, nothing written yet."""

    is_main: bool = True  # only the main process writes the run directory (several-process runs)

    def run(self, run_dir: "RunDirectory") -> "RunResult":
        """Train (resuming from the run directory's checkpoints if asked) and evaluate every row."""
        raise NotImplementedError

    def figures(self, plots_dir: Path) -> list[Path]:
        """The family's own figures for the report (written into `plots_dir`), after the common ones."""
        return []

    def close(self) -> None:
        """Called on every process after the report is written (e.g. a barrier)."""


class Family:
    """What core asks of a model family. Subclasses set the attributes and implement the methods."""

    task: str = ""  # the recipe's `task:` value
    teacher_tasks: tuple[str, ...] = ()  # built-in data `distill train-teacher builtin:<name>` trains for

    def recipe_class(self) -> type["RunRecipe"]:
        raise NotImplementedError

    def recognizes(self, path: Path) -> bool:
        """Whether the directory `path` holds a saved model of this family."""
        return False

    def prepare(self, recipe: "RunRecipe", run_dir: "RunDirectory") -> Job:
        """Load data and models and check everything that can fail, before anything is written."""
        raise NotImplementedError

    def saved_models(self, run_dir: Path) -> dict[str, Path]:
        """Row name -> saved model directory, for the models a finished run wrote (`distill eval`)."""
        raise NotImplementedError

    def eval_recipe(self, model: Path, data: str | None) -> dict[str, Any]:
        """A recipe (as a dict) that evaluates the lone saved model `model` on `data` (`builtin:<task>` or a
        file; None: the family's default), for `distill eval MODEL`."""
        raise NotImplementedError

    def evaluate(self, recipe: "RunRecipe", models: dict[str, Path]) -> "RunResult":
        """Evaluate saved models (row name -> directory) as a run evaluates its rows; the recipe's
        teacher, if it has one, is the `teacher` row."""
        raise NotImplementedError

    def train_teacher(self, task: str, out: str, **options) -> dict:
        """Train the teacher of built-in data `task` into `out`; return its metrics."""
        raise NotImplementedError


def register_family(task: str, module: str) -> None:
    """Declare that `module` (a package defining `FAMILY`) handles recipes with `task: <task>`."""
    _MODULES[task] = module


def family_names() -> list[str]:
    return list(_MODULES)


def get_family(task: str) -> Family:
    """The family of `task`, its module imported on first use."""
    if task not in _MODULES:
        raise DistillError(f"unknown task `{task}`", field="task", fix=f"use one of: {', '.join(_MODULES)}")
    if task not in _LOADED:
        _LOADED[task] = importlib.import_module(_MODULES[task]).FAMILY
    return _LOADED[task]


def family_of_model(path: Path) -> Family | None:
    """The family that recognizes the saved model at `path`, or None."""
    return next((get_family(task) for task in _MODULES if get_family(task).recognizes(Path(path))), None)
