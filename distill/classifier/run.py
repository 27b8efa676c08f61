"""Classifier runs: from a recipe (`distill run` with `task: classifier`) or from Python with any
`nn.Module`s (`distill.distill_classifier`). Both end with the three rows on the same eval data
(teacher / student alone / distilled student) in results.json, report.md and report.html.

    import distill
    result = distill.distill_classifier(teacher, student, train=(x, y), eval=(x_eval, y_eval),
                                        objective=[{"loss": "kd", "temperature": 4}], output="runs/mine")
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from distill.classifier.evaluate import evaluate_classifier, predict_logits
from distill.core.hooks import forward
from distill.classifier.models import build_classifier, load_classifier, save_classifier
from distill.classifier.recipe import (CE_TERM, ClassifierEvalSpec, ClassifierRecipe, ClassifierRegimeSpec,
                                       ClassifierTrainSpec, TermSpec)
from distill.core.errors import DistillError
from distill.losses.ensemble import combine_teachers
from distill.classifier.trainer import ClassifierTrainer


class Ensemble(nn.Module):
    """Several teachers as one model: its logits are the combined target (for the report's teacher row)."""

    def __init__(self, teachers: list[nn.Module], mode: str):
        super().__init__()
        self.teachers, self.mode = nn.ModuleList(teachers), mode

    def forward(self, x):
        return combine_teachers([forward(t, x) for t in self.teachers], mode=self.mode)


def _size(inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def _subset(inputs, keep: torch.Tensor):
    return {k: v[keep] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[keep]


def _num_classes(model: nn.Module, probe, field: str) -> int:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            logits = forward(model, probe)
        except Exception as error:  # the model cannot take the data: say which model and what shape
            shape = {k: tuple(v.shape) for k, v in probe.items()} if isinstance(probe, dict) else tuple(probe.shape)
            raise DistillError(f"the model failed on a batch of inputs {shape}: {type(error).__name__}: {error}",
                               field=field, fix="give a model whose input matches the data") from None
        model.train(was_training)
    if logits.dim() != 2:
        raise DistillError(f"the model returns logits of shape {tuple(logits.shape)}, expected [batch, classes]",
                           field=field, fix="return class logits (or an output with .logits)")
    return logits.shape[-1]


def save_student(model: nn.Module, directory: Path, describe: dict | None) -> None:
    """transformers models: save_pretrained; built-in architectures: save_classifier; others: the state dict."""
    describe = describe or getattr(model, "distill_describe", None)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    elif describe is not None:
        save_classifier(model, directory, **describe)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model.safetensors"))
        (directory / "classifier.json").write_text(json.dumps({"arch": "custom", "class": type(model).__qualname__,
                                                               "module": type(model).__module__}, indent=1))


def train_and_report(*, teachers: list[nn.Module], make_student: Callable[[], nn.Module], train: tuple, eval: tuple,
                     terms: list[TermSpec], regime: ClassifierRegimeSpec, spec: ClassifierTrainSpec,
                     eval_spec: ClassifierEvalSpec, run_dir: Path, name: str, recipe_dump: dict | None = None,
                     describe_student: dict | None = None, make_peer: Callable[[], nn.Module] | None = None,
                     exclude_classes: list[int] | None = None):
    """Train the distilled student (and the student alone on labels), evaluate the rows, write the report."""
    from distill.core.rundir import RunResult
    from distill.core.report import write_report

    started = time.perf_counter()
    train_x, train_y = train
    eval_x, eval_y = eval
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = _subset(eval_x, torch.arange(min(2, _size(eval_x))))
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
    student = make_student()
    student_classes = _num_classes(student, probe, "student")
    for index, teacher in enumerate(teachers):
        teacher_classes = _num_classes(teacher, probe, "teacher" if len(teachers) == 1 else f"teachers.{index}")
        if teacher_classes != student_classes:
            raise DistillError(f"the teacher predicts {teacher_classes} classes and the student {student_classes}",
                               field="student", fix="give the student a head of the teacher's class count")
    if student_classes < num_classes:
        raise DistillError(f"the data has labels up to {num_classes - 1} but the student predicts {student_classes} "
                           "classes", field="student", fix="match the student's head to the data's classes")
    if exclude_classes:  # Hinton's omitted-class experiment: the transfer set lacks these classes
        keep = ~torch.isin(train_y, torch.tensor(exclude_classes))
        train_x, train_y = _subset(train_x, keep), train_y[keep]
    teacher_model = (teachers[0] if len(teachers) == 1 else Ensemble(teachers, regime.combine).eval()) if teachers else None
    teacher_eval_logits = predict_logits(teacher_model, eval_x, eval_spec.batch_size) if teacher_model else None
    watch = sorted(set(exclude_classes or []))

    def evaluate(model, final: bool = False) -> dict:
        return evaluate_classifier(model, eval_x, eval_y, batch_size=eval_spec.batch_size, bins=eval_spec.ece_bins,
                                   teacher_logits=teacher_eval_logits, final=final, class_accuracy=watch)

    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "losses.jsonl").unlink(missing_ok=True)
    common = dict(train_x=train_x, train_y=train_y, spec=spec, evaluate=evaluate,
                  eval_every_epochs=eval_spec.every_epochs, metrics_file=run_dir / "metrics.jsonl",
                  losses_file=run_dir / "losses.jsonl")
    if regime.kind == "online" and make_peer is None:
        raise DistillError("regime online trains two models together; no peer was given", field="peer",
                           fix="pass peer=<a second model> (or regime.peer in a recipe)")
    peer = make_peer() if regime.kind == "online" else None
    distilled = ClassifierTrainer(student, terms, regime=regime, phase="distilled", teachers=teachers, peer=peer,
                                  **common).fit()
    rows = {}
    if teacher_model is not None:
        rows["teacher"] = evaluate(teacher_model, final=True)
    elif peer is not None:
        rows["teacher"] = evaluate(peer, final=True)  # online: the peer it learned with
    if spec.baseline:
        alone = ClassifierTrainer(make_student(), [TermSpec(loss=CE_TERM)], regime=ClassifierRegimeSpec(),
                                  phase="alone", **common).fit()
        rows["alone"] = evaluate(alone, final=True)
        save_student(alone, run_dir / "alone", describe_student)
    rows["distilled"] = evaluate(distilled, final=True)
    save_student(distilled, run_dir / "student", describe_student)
    extras = {"seconds": time.perf_counter() - started, "world_size": 1,
              "recipe": recipe_dump or {"name": name}, "train_examples": int(len(train_y))}
    if peer is not None:
        extras["teacher_row"] = "the online peer"
    result = RunResult(run_dir, rows, "accuracy", True, extras)
    write_report(result)
    return result


def _load_teacher(spec, field: str) -> nn.Module:
    if spec.path is not None:
        return load_classifier(spec.path, field)[0]
    raise DistillError("a teacher must be a trained model", field=field, fix="give `path` (a saved classifier)")


def run_classifier(recipe: ClassifierRecipe, *, resume: bool = False, overwrite: bool = False):
    """`distill run` for `task: classifier` recipes."""
    from distill.core.rundir import prepare_output_dir
    from distill.classifier.data import load_image_task

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if resume:
        raise DistillError("classifier runs take seconds to minutes and do not resume", field="--resume",
                           fix="run again with --overwrite")
    run_dir = recipe.output_dir
    prepare_output_dir(run_dir, resume=False, overwrite=overwrite, is_main=True)
    data = load_image_task(recipe.data.builtin, eval_size=recipe.data.eval_size, seed=recipe.data.seed,
                           train_size=recipe.data.train_size)
    bad = [c for c in recipe.data.exclude_classes if not 0 <= c < data.num_classes]
    if bad:
        raise DistillError(f"classes {bad} do not exist in {recipe.data.builtin}", field="data.exclude_classes",
                           fix=f"use classes in 0..{data.num_classes - 1}")
    specs = recipe.teachers or ([recipe.teacher] if recipe.teacher is not None else [])
    field = "teacher.path" if recipe.teacher is not None else "teachers"
    teachers = [_load_teacher(spec, field if len(specs) == 1 else f"teachers.{i}.path") for i, spec in enumerate(specs)]

    def model_from(spec, seed: int, field: str) -> tuple[nn.Module, dict | None]:
        if spec.path is not None:
            torch.manual_seed(seed)
            model, config = load_classifier(spec.path, field)
            return model.train(), {k: config[k] for k in ("arch", "input_shape", "num_classes", "options")}
        describe = {"arch": spec.arch, "input_shape": data.input_shape, "num_classes": data.num_classes,
                    "options": spec.options}
        return build_classifier(spec.arch, data.input_shape, data.num_classes, spec.options, seed=seed,
                                field=f"{field.rsplit('.', 1)[0]}.arch"), describe

    _, describe = model_from(recipe.student, recipe.train.seed, "student.path")
    peer_spec = recipe.regime.peer or recipe.student
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    return train_and_report(
        teachers=teachers, make_student=lambda: model_from(recipe.student, recipe.train.seed, "student.path")[0],
        make_peer=lambda: model_from(peer_spec, recipe.train.seed + 1, "regime.peer.path")[0],
        train=(data.train_x, data.train_y), eval=(data.eval_x, data.eval_y), terms=recipe.objective.terms,
        regime=recipe.regime, spec=recipe.train, eval_spec=recipe.eval, run_dir=run_dir, name=recipe.name,
        recipe_dump=recipe.model_dump(mode="json"), describe_student=describe,
        exclude_classes=recipe.data.exclude_classes)


def distill_classifier(teacher: nn.Module | list[nn.Module] | None, student: nn.Module, *, train: tuple, eval: tuple,
                       objective: list[dict] | None = None, regime: dict | None = None, train_options: dict | None = None,
                       eval_options: dict | None = None, output: str | Path = "runs/classifier", peer: nn.Module | None = None,
                       overwrite: bool = False):
    """Distill any `nn.Module` teacher(s) into any `nn.Module` student (Python API).

    `train` / `eval` are (inputs, labels): inputs a tensor or a dict of tensors (transformers batches),
    labels int64 [N]. `objective` is a list of terms as in a recipe (default [{loss: kd}]); `regime`,
    `train_options`, `eval_options` take the recipe sections' fields. The student given is the distilled
    one; the `alone` row trains a deep copy of its initial weights on labels. Returns the RunResult."""
    from distill.classifier.recipe import ClassifierObjectiveSpec
    from distill.core.rundir import prepare_output_dir
    from distill.lm.recipe import _readable
    from pydantic import ValidationError

    try:
        terms = ClassifierObjectiveSpec.model_validate({"terms": objective or [{"loss": "kd"}]}).terms
        regime_spec = ClassifierRegimeSpec.model_validate(regime or {})
        spec = ClassifierTrainSpec.model_validate(train_options or {})
        eval_spec = ClassifierEvalSpec.model_validate(eval_options or {})
    except ValidationError as error:
        raise _readable(error) from None
    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(output)
    prepare_output_dir(run_dir, resume=False, overwrite=overwrite, is_main=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(json.dumps({"api": "distill_classifier", "objective": objective,
                                                     "regime": regime, "train": train_options}, indent=1))
    teachers = [] if teacher is None else (list(teacher) if isinstance(teacher, (list, tuple)) else [teacher])
    initial = copy.deepcopy(student)
    made = iter([student])

    def make_student() -> nn.Module:  # first the student given, then fresh copies of its initial weights
        return next(made, None) or copy.deepcopy(initial)
    return train_and_report(teachers=teachers, make_student=make_student, train=train, eval=eval, terms=terms,
                            regime=regime_spec, spec=spec, eval_spec=eval_spec, run_dir=run_dir, name=run_dir.name,
                            make_peer=(lambda: peer) if peer is not None else None)
