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

from distill.core.families import Family


class ClassifierFamily(Family):
    task = "classifier"
    teacher_tasks = ("digits", "mnist5k")
    teacher_options = ("epochs", "seed", "threads", "overwrite")
    model_file = "classifier.json"  # models.CONFIG_FILE, without importing torch
    entry_points = {"recipe": "distill.classifier.recipe:ClassifierRecipe",
                    "prepare": "distill.classifier.run:prepare",
                    "saved_models": "distill.classifier.run:saved_models",
                    "eval_recipe": "distill.classifier.run:lone_model_recipe",
                    "evaluate": "distill.classifier.run:evaluate_saved",
                    "train_teacher": "distill.classifier.train_teacher:train_image_teacher"}


FAMILY = ClassifierFamily()
