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
    # Recipes are pydantic models (core.recipe.RunRecipe); core.recipe reads this registry, so the
    # annotations here name their base class and do not import core.recipe back.
    from pydantic import BaseModel as RunRecipe
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
    """What core asks of a model family. A subclass declares its task, its teacher tasks and options, the
    file that marks a saved model, and where each part lives (`entry_points`, role -> "module:name",
    imported on first use: a classifier run never imports transformers, a diffusion one no LM code):

        recipe         the recipe class (a core.recipe.RunRecipe)
        prepare        (recipe, run_dir) -> Job: load data and models and check everything, write nothing
        saved_models   (run_dir) -> {row name: model directory} of a finished run (`distill eval RUN`)
        eval_recipe    (model_dir, data | None) -> a recipe dict scoring the lone saved model on `data`
                       (`builtin:<task>` or a file; None: what the model records)
        evaluate       (recipe, {row: model_dir}) -> RunResult: the rows a run reports, for saved models
                       (the recipe's teacher, if it has one, is the `teacher` row)
        train_teacher  (task, out, **options) -> metrics: the teacher of built-in data `task`
    """

    task: str = ""  # the recipe's `task:` value
    teacher_tasks: tuple[str, ...] = ()  # built-in data `distill train-teacher builtin:<name>` trains for
    teacher_options: tuple[str, ...] = ()  # the `distill train-teacher` options its train_teacher takes
    model_file: str | None = None  # the file whose presence marks a saved model of this family
    entry_points: dict[str, str] = {}

    def _entry(self, role: str):
        module, _, name = self.entry_points[role].partition(":")
        return getattr(importlib.import_module(module), name)

    def recipe_class(self) -> type["RunRecipe"]:
        return self._entry("recipe")

    def recognizes(self, path: Path) -> bool:
        """Whether the directory `path` holds a saved model of this family."""
        return self.model_file is not None and (Path(path) / self.model_file).is_file()

    def prepare(self, recipe: "RunRecipe", run_dir: "RunDirectory") -> Job:
        return self._entry("prepare")(recipe, run_dir)

    def saved_models(self, run_dir: Path) -> dict[str, Path]:
        return self._entry("saved_models")(Path(run_dir))

    def eval_recipe(self, model: Path, data: str | None) -> dict[str, Any]:
        return self._entry("eval_recipe")(Path(model), data)

    def evaluate(self, recipe: "RunRecipe", models: dict[str, Path]) -> "RunResult":
        return self._entry("evaluate")(recipe, models)

    def train_teacher(self, task: str, out: str, **options) -> dict:
        return self._entry("train_teacher")(task.removeprefix("builtin:"), out, **options)


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
