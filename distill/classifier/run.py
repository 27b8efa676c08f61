"""A classifier run: teachers, student and data -> the distilled student and the student alone -> three
rows on the same eval data (teacher / alone / distilled). `prepare` (a recipe, `distill run`) and
`distill.distill_classifier` (any nn.Modules, classifier/api.py) both build a `ClassifierJob`; the
skeleton around it (run directory, recipe.yaml, report) is core's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from distill.classifier.data import IMAGE_TASKS, load_image_task
from distill.classifier.evaluate import evaluate_classifier, predict_logits
from distill.classifier.models import CONFIG_FILE, build_classifier, load_classifier, save_classifier
from distill.classifier.recipe import (CE_TERM, ClassifierEvalSpec, ClassifierRecipe, ClassifierRegimeSpec,
                                       ClassifierTrainSpec, TermSpec)
from distill.classifier.trainer import ClassifierTrainer
from distill.core.errors import DistillError
from distill.core.families import Job
from distill.core.hooks import forward
from distill.core.io import staged_directory
from distill.core.rundir import RunDirectory, RunResult
from distill.losses.ensemble import combine_teachers

ROW_DIRS = {"alone": "alone", "distilled": "student"}  # where each trained row's model is saved
ROWS_NOTE = ("Rows are evaluated on the same eval data; `alone` is the student trained on hard labels with the same "
             "init, data order and steps.")


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
    """transformers models: save_pretrained; built-in architectures: save_classifier; others: the state dict
    (a custom module: reload it with `load_state_dict`). Written atomically."""
    describe = describe or getattr(model, "distill_describe", None)
    if hasattr(model, "save_pretrained"):
        with staged_directory(directory) as staging:
            model.save_pretrained(staging)
    elif describe is not None:
        save_classifier(model, directory, **describe)
    else:
        with staged_directory(directory) as staging:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(staging / "model.safetensors"))
            (staging / CONFIG_FILE).write_text(json.dumps({"arch": "custom", "class": type(model).__qualname__,
                                                           "module": type(model).__module__}, indent=1))


class Evaluator:
    """Every metric of a model on the eval data (with agreement to the teacher, when there is one)."""

    def __init__(self, eval_x, eval_y, eval_spec: ClassifierEvalSpec, teacher: nn.Module | None,
                 watch_classes: list[int]):
        self.eval_x, self.eval_y, self.spec, self.watch = eval_x, eval_y, eval_spec, sorted(set(watch_classes))
        self.teacher_logits = predict_logits(teacher, eval_x, eval_spec.batch_size) if teacher is not None else None

    def __call__(self, model: nn.Module, final: bool = False) -> dict:
        return evaluate_classifier(model, self.eval_x, self.eval_y, batch_size=self.spec.batch_size,
                                   bins=self.spec.ece_bins, teacher_logits=self.teacher_logits, final=final,
                                   class_accuracy=self.watch)


class ClassifierJob(Job):
    """A prepared classifier run: models and data checked, the distilled trainer built (hook names, shapes,
    projectors, class means checked). Nothing written until `run`."""

    def __init__(self, *, teachers: list[nn.Module], make_student: Callable[[], nn.Module], train: tuple,
                 eval: tuple, terms: list[TermSpec], regime: ClassifierRegimeSpec, spec: ClassifierTrainSpec,
                 eval_spec: ClassifierEvalSpec, make_peer: Callable[[], nn.Module] | None = None,
                 describe_student: dict | None = None, exclude_classes: list[int] | None = None):
        self.started = time.perf_counter()
        self.spec, self.describe_student, self.make_student = spec, describe_student, make_student
        train_x, train_y = train
        eval_x, eval_y = eval
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
            raise DistillError(f"the data has labels up to {num_classes - 1} but the student predicts "
                               f"{student_classes} classes", field="student",
                               fix="match the student's head to the data's classes")
        if exclude_classes:  # Hinton's omitted-class experiment: the transfer set lacks these classes
            keep = ~torch.isin(train_y, torch.tensor(exclude_classes))
            train_x, train_y = _subset(train_x, keep), train_y[keep]
        if regime.kind == "online" and make_peer is None:
            raise DistillError("regime online trains two models together; no peer was given", field="peer",
                               fix="pass peer=<a second model> (or regime.peer in a recipe)")
        self.peer = make_peer() if regime.kind == "online" else None
        self.teacher = (teachers[0] if len(teachers) == 1 else Ensemble(teachers, regime.combine).eval()) \
            if teachers else None
        self.evaluate = Evaluator(eval_x, eval_y, eval_spec, self.teacher, exclude_classes or [])
        self.train_x, self.train_y, self.eval_spec = train_x, train_y, eval_spec
        self.distilled = ClassifierTrainer(student, terms, train_x, train_y, spec, regime, phase="distilled",
                                           teachers=teachers, peer=self.peer, evaluate=self.evaluate,
                                           eval_every_epochs=eval_spec.every_epochs)

    def run(self, run_dir: RunDirectory) -> RunResult:
        trainers = [self.distilled]
        if self.spec.baseline:
            trainers.append(ClassifierTrainer(self.make_student(), [TermSpec(loss=CE_TERM)], self.train_x,
                                              self.train_y, self.spec, ClassifierRegimeSpec(), phase="alone",
                                              evaluate=self.evaluate, eval_every_epochs=self.eval_spec.every_epochs))
        trained = {}
        for trainer in trainers:
            trainer.run_dir = run_dir
            trained[trainer.phase] = trainer.fit(resume=run_dir.resume)
            save_student(trained[trainer.phase], run_dir.path / ROW_DIRS[trainer.phase], self.describe_student)
        rows = {}
        if self.teacher is not None:
            rows["teacher"] = self.evaluate(self.teacher, final=True)
        elif self.peer is not None:
            rows["teacher"] = self.evaluate(self.peer, final=True)  # online: the peer it learned with
        for phase in ("alone", "distilled"):
            if phase in trained:
                rows[phase] = self.evaluate(trained[phase], final=True)
        notes = ["the teacher row is the online peer the student learned with"] if self.teacher is None and \
            self.peer is not None else []
        privacy = {t.phase: t.privacy for t in trainers if getattr(t, "privacy", None)}
        if privacy:
            from distill.core.privacy import privacy_note

            notes += [privacy_note(phase, summary) for phase, summary in privacy.items()]
            for phase, summary in privacy.items():
                rows[phase]["epsilon"] = summary["epsilon"]
        meta = {**classifier_meta(), "notes": notes, "seconds": time.perf_counter() - self.started,
                "train_examples": int(len(self.train_y)), **({"privacy": privacy} if privacy else {})}
        return RunResult(run_dir.path, rows, meta)


def classifier_meta() -> dict:
    return {"primary_metric": "accuracy", "higher_is_better": True, "world_size": 1, "rows_note": ROWS_NOTE}


# ---- recipes (`distill run`, `distill eval`) -------------------------------------------------------------

def _load_teachers(recipe: ClassifierRecipe) -> list[nn.Module]:
    specs = recipe.teachers or ([recipe.teacher] if recipe.teacher is not None else [])
    field = "teacher.path" if recipe.teacher is not None else "teachers"
    teachers = []
    for index, spec in enumerate(specs):
        where = field if len(specs) == 1 else f"teachers.{index}.path"
        if spec.path is None:
            raise DistillError("a teacher must be a trained model", field=where,
                               fix="give `path` (a saved classifier)")
        teachers.append(load_classifier(spec.path, where)[0])
    return teachers


def _load_data(recipe: ClassifierRecipe):
    data = load_image_task(recipe.data.builtin, eval_size=recipe.data.eval_size, seed=recipe.data.seed,
                           train_size=recipe.data.train_size)
    bad = [c for c in recipe.data.exclude_classes if not 0 <= c < data.num_classes]
    if bad:
        raise DistillError(f"classes {bad} do not exist in {recipe.data.builtin}", field="data.exclude_classes",
                           fix=f"use classes in 0..{data.num_classes - 1}")
    return data


def prepare(recipe: ClassifierRecipe, run_dir: RunDirectory) -> ClassifierJob:
    """Data, teachers and students loaded and checked (`distill run`). Nothing written."""
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    data = _load_data(recipe)
    teachers = _load_teachers(recipe)

    def model_from(spec, seed: int, field: str) -> tuple[nn.Module, dict]:
        if spec.path is not None:
            torch.manual_seed(seed)
            model, config = load_classifier(spec.path, field)
            describe = {k: config[k] for k in ("arch", "input_shape", "num_classes", "options")}
            return model.train(), {**describe, "task": recipe.data.builtin}
        describe = {"arch": spec.arch, "input_shape": data.input_shape, "num_classes": data.num_classes,
                    "options": spec.options, "task": recipe.data.builtin}
        return build_classifier(spec.arch, data.input_shape, data.num_classes, spec.options, seed=seed,
                                field=f"{field.rsplit('.', 1)[0]}.arch"), describe

    _, describe = model_from(recipe.student, recipe.train.seed, "student.path")
    peer_spec = recipe.regime.peer or recipe.student
    return ClassifierJob(
        teachers=teachers, make_student=lambda: model_from(recipe.student, recipe.train.seed, "student.path")[0],
        make_peer=lambda: model_from(peer_spec, recipe.train.seed + 1, "regime.peer.path")[0],
        train=(data.train_x, data.train_y), eval=(data.eval_x, data.eval_y), terms=recipe.objective.terms,
        regime=recipe.regime, spec=recipe.train, eval_spec=recipe.eval, describe_student=describe,
        exclude_classes=recipe.data.exclude_classes)


def saved_models(run_dir: Path) -> dict[str, Path]:
    return {row: run_dir / name for row, name in ROW_DIRS.items() if (run_dir / name / CONFIG_FILE).is_file()}


def lone_model_recipe(model: Path, data: str | None) -> dict:
    """A recipe evaluating the saved classifier `model` alone, on `data` (`builtin:<task>`; None: the task it
    was trained on, or the built-in task of its input shape)."""
    config = json.loads((Path(model) / CONFIG_FILE).read_text())
    if data is None:
        shapes = {(1, 8, 8): "digits", (1, 28, 28): "mnist5k"}
        task = config.get("task") or shapes.get(tuple(config.get("input_shape", ())))
        if task is None:
            raise DistillError(f"cannot tell which data `{model}` was trained on", field="--data",
                               fix=f"pass --data builtin:<task> ({', '.join(IMAGE_TASKS)})")
    else:
        task = data.removeprefix("builtin:")
        if task not in IMAGE_TASKS:
            raise DistillError(f"no built-in classifier data `{data}`", field="--data",
                               fix=f"use one of: {', '.join('builtin:' + t for t in IMAGE_TASKS)}")
    # regime `self` is the one without a separate teacher: the lone model is evaluated, nothing trains.
    return {"task": "classifier", "name": "eval", "student": {"path": str(model)}, "data": {"builtin": task},
            "regime": {"kind": "self"}}


def evaluate_saved(recipe: ClassifierRecipe, models: dict[str, Path]) -> RunResult:
    """The rows of saved models on the recipe's eval data (the teacher's row first, when it has one)."""
    started = time.perf_counter()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    data = _load_data(recipe)
    teachers = _load_teachers(recipe)
    teacher = (teachers[0] if len(teachers) == 1 else Ensemble(teachers, recipe.regime.combine).eval()) \
        if teachers else None
    evaluate = Evaluator(data.eval_x, data.eval_y, recipe.eval, teacher, recipe.data.exclude_classes)
    rows = {"teacher": evaluate(teacher, final=True)} if teacher is not None else {}
    for row, path in models.items():
        model, _ = load_classifier(str(path), "MODEL")
        rows[row] = evaluate(model, final=True)
    return RunResult(None, rows, {**classifier_meta(), "seconds": time.perf_counter() - started})
