"""Causal LMs (`task: lm`): Hugging Face teachers and students, token-level distillation.

    recipe.py     the recipe sections          data.py       records, tokenization, batches
    models.py     load, build, save students   tasks/        built-in tasks with exact ground truth
    teacher/      teacher signals: live forward, top-k cache, generated sequences
    generate.py   batched KV-cache sampling    objective.py  the token objective (plain / fused)
    regimes.py    off-policy, on-policy, OPD, self-distillation, as objects
    trainer.py    the accelerate loop          evaluate.py   metrics of a model on the eval data
    run.py        prepare and run a recipe     train_teacher.py  teachers of the built-in tasks

This module stays light (no torch, no transformers): the family registry imports it to read a recipe.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill.core.families import Family


class LMFamily(Family):
    task = "lm"
    teacher_tasks = ("oracle", "arithmetic")

    def recipe_class(self):
        from distill.lm.recipe import LMRecipe

        return LMRecipe

    def recognizes(self, path: Path) -> bool:
        config = path / "config.json"
        if not config.is_file():
            return False
        architectures = json.loads(config.read_text()).get("architectures") or []
        return any(name.endswith("ForCausalLM") for name in architectures)

    def prepare(self, recipe, run_dir):
        from distill.lm.run import prepare

        return prepare(recipe, run_dir)

    def saved_models(self, run_dir: Path) -> dict[str, Path]:
        from distill.lm.run import ROW_DIRS

        return {row: run_dir / name for row, name in ROW_DIRS.items() if (run_dir / name / "config.json").is_file()}

    def eval_recipe(self, model: Path, data: str | None) -> dict:
        from distill.lm.evaluation import lone_model_recipe

        return lone_model_recipe(model, data)

    def evaluate(self, recipe, models: dict[str, Path]):
        from distill.lm.evaluation import evaluate_saved

        return evaluate_saved(recipe, models)

    def train_teacher(self, task: str, out: str, **options) -> dict:
        from distill.lm.train_teacher import train_teacher

        return train_teacher(task, out, **options)


FAMILY = LMFamily()
