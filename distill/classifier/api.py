"""`distill.distill_classifier`: distill any `nn.Module` teacher(s) into any `nn.Module` student from Python.

    import distill
    result = distill.distill_classifier(teacher, student, train=(x, y), eval=(x_eval, y_eval),
                                        objective=[{"loss": "kd", "temperature": 4}], output="runs/mine")

The run directory is the same as a recipe run's: recipe.yaml records the call (its sections resolved,
the models and data described), logs, checkpoints (`resume=True` continues a killed run with the same
modules), results.json and the report.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import nn

from distill.classifier.recipe import (ClassifierEvalSpec, ClassifierObjectiveSpec, ClassifierRegimeSpec,
                                       ClassifierTrainSpec)
from distill.core.recipe import RunRecipe, validate_section


class ClassifierCall(RunRecipe):
    """What recipe.yaml records of a `distill_classifier` call: the resolved sections, and the models and
    data it was given, described (they are Python objects, not files)."""

    task: Literal["classifier"] = "classifier"
    api: Literal["distill_classifier"] = "distill_classifier"
    teachers: list[str] = Field(default_factory=list, description="The teachers' classes.")
    student: str = Field(description="The student's class.")
    peer: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="Sizes of the training and eval data.")
    objective: ClassifierObjectiveSpec
    regime: ClassifierRegimeSpec
    train: ClassifierTrainSpec
    eval: ClassifierEvalSpec


def _describe(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _size(inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def distill_classifier(teacher: nn.Module | list[nn.Module] | None, student: nn.Module, *, train: tuple, eval: tuple,
                       objective: list[dict] | None = None, regime: dict | None = None,
                       train_options: dict | None = None, eval_options: dict | None = None,
                       output: str | Path = "runs/classifier", peer: nn.Module | None = None,
                       overwrite: bool = False, resume: bool = False):
    """Distill any `nn.Module` teacher(s) into any `nn.Module` student (Python API).

    `train` / `eval` are (inputs, labels): inputs a tensor or a dict of tensors (transformers batches),
    labels int64 [N]. `objective` is a list of terms as in a recipe (default [{loss: kd}]); `regime`,
    `train_options`, `eval_options` take the recipe sections' fields. The student given is the distilled
    one; the `alone` row trains a deep copy of its initial weights on labels. `resume=True` continues a
    killed run from its last checkpoint (give the same models, in their initial state). Returns the RunResult."""
    import torch

    from distill.classifier.run import ClassifierJob
    from distill.core.run import run_job

    teachers = [] if teacher is None else (list(teacher) if isinstance(teacher, (list, tuple)) else [teacher])
    output = Path(output)
    call = ClassifierCall(
        name=output.name, output=str(output), teachers=[_describe(t) for t in teachers],
        student=_describe(student), peer=_describe(peer) if peer is not None else None,
        data={"train_examples": _size(train[0]), "eval_examples": _size(eval[0])},
        objective=validate_section(ClassifierObjectiveSpec, {"terms": objective or [{"loss": "kd"}]}, "objective."),
        regime=validate_section(ClassifierRegimeSpec, regime or {}, "regime."),
        train=validate_section(ClassifierTrainSpec, train_options or {}, "train_options."),
        eval=validate_section(ClassifierEvalSpec, eval_options or {}, "eval_options."))
    if call.train.threads:
        torch.set_num_threads(call.train.threads)
    initial = copy.deepcopy(student)
    made = iter([student])

    def make_student() -> nn.Module:  # first the student given, then fresh copies of its initial weights
        return next(made, None) or copy.deepcopy(initial)

    def prepare(run_dir) -> ClassifierJob:
        return ClassifierJob(teachers=teachers, make_student=make_student, train=train, eval=eval,
                             terms=call.objective.terms, regime=call.regime, spec=call.train, eval_spec=call.eval,
                             make_peer=(lambda: peer) if peer is not None else None)
    return run_job(call, prepare, resume=resume, overwrite=overwrite)
