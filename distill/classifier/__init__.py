"""Classifier and feature distillation (`task: classifier`): any `torch.nn.Module` teacher and student,
features taken by forward hooks on named modules, the classifier and feature terms of the loss registry,
and the three-row report (teacher / alone / distilled).

    recipe.py     the recipe sections          data.py       the built-in image tasks
    models.py     built-in architectures, save / load        evaluate.py   accuracy, NLL, ECE, agreement
    trainer.py    the training loop (resumable)              run.py        prepare and run; evaluate saved models
    api.py        distill_classifier: any nn.Modules from Python
    train_teacher.py  teachers of the built-in tasks

This module stays light (no torch): the family registry imports it to read a recipe.
"""
from __future__ import annotations

from pathlib import Path

from distill.core.families import Family


class ClassifierFamily(Family):
    task = "classifier"
    teacher_tasks = ("digits", "mnist5k")

    def recipe_class(self):
        from distill.classifier.recipe import ClassifierRecipe

        return ClassifierRecipe

    def recognizes(self, path: Path) -> bool:
        return (path / "classifier.json").is_file()

    def prepare(self, recipe, run_dir):
        from distill.classifier.run import prepare

        return prepare(recipe, run_dir)

    def saved_models(self, run_dir: Path) -> dict[str, Path]:
        from distill.classifier.run import saved_models

        return saved_models(run_dir)

    def eval_recipe(self, model: Path, data: str | None) -> dict:
        from distill.classifier.run import lone_model_recipe

        return lone_model_recipe(model, data)

    def evaluate(self, recipe, models: dict[str, Path]):
        from distill.classifier.run import evaluate_saved

        return evaluate_saved(recipe, models)

    def train_teacher(self, task: str, out: str, **options) -> dict:
        from distill.classifier.train_teacher import train_image_teacher

        return train_image_teacher(task, out, **options)


FAMILY = ClassifierFamily()
