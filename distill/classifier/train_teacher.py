"""Teachers for the built-in image tasks (`distill train-teacher builtin:digits|mnist5k`): a small CNN
trained on labels with the classifier loop, saved as a classifier directory."""
from __future__ import annotations

from pathlib import Path

import torch

from distill.classifier.evaluate import evaluate_classifier
from distill.classifier.models import build_classifier, save_classifier
from distill.classifier.recipe import CE_TERM, ClassifierRegimeSpec, ClassifierTrainSpec, TermSpec
from distill.core.errors import DistillError
from distill.classifier.data import IMAGE_TASKS, load_image_task
from distill.classifier.trainer import ClassifierTrainer

TEACHER_SHAPES = {"digits": {"channels": [32, 64], "hidden": 128}, "mnist5k": {"channels": [32, 64], "hidden": 128}}
EVAL_SIZES = {"digits": 300, "mnist5k": 1000}  # the recipes' default split: the teacher never sees their eval set


def train_image_teacher(task: str, out: str | Path, *, epochs: float = 15, batch_size: int = 64, lr: float = 2e-3,
                        seed: int = 0, threads: int | None = 1, overwrite: bool = False) -> dict:
    """Train the task's CNN teacher on its train split (data seed 0) and save it to `out`; return eval metrics."""
    if task not in IMAGE_TASKS:
        raise DistillError(f"no built-in image task `{task}`", field="TASK", fix=f"use one of: {', '.join(IMAGE_TASKS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DistillError(f"`{out}` is not empty", field="--out", fix="pass --overwrite or choose another directory")
    if threads:
        torch.set_num_threads(threads)
    data = load_image_task(task, eval_size=EVAL_SIZES[task], seed=0)
    options = TEACHER_SHAPES[task]
    model = build_classifier("cnn", data.input_shape, data.num_classes, options, seed=seed)
    spec = ClassifierTrainSpec(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, weight_decay=1e-4)
    ClassifierTrainer(model, [TermSpec(loss=CE_TERM)], data.train_x, data.train_y, spec, ClassifierRegimeSpec(),
                      phase="teacher").fit()
    save_classifier(model, out, arch="cnn", input_shape=data.input_shape, num_classes=data.num_classes, options=options,
                    task=task)
    return evaluate_classifier(model, data.eval_x, data.eval_y, batch_size=500, final=True)
