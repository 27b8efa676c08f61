"""Causal LMs (`task: lm`): Hugging Face teachers and students, token-level distillation.

    recipe.py     the recipe sections          data.py       records, tokenization, batches
    models.py     load, build, save students   tasks/        built-in tasks with exact ground truth
    teacher/      teacher signals: live forward, top-k cache, generated sequences
    generate.py   batched KV-cache sampling    objective.py  the token objective (plain / fused)
    regimes.py    off-policy, on-policy, OPD, self-distillation, as objects
    trainer.py    the accelerate loop          evaluate.py   metrics of a model on the eval data
    run.py        prepare and run a recipe     evaluation.py `distill eval` of saved models
    train_teacher.py  teachers of the built-in tasks

This module stays light (no torch, no transformers): the family registry imports it to read a recipe.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill.core.families import Family


class LMFamily(Family):
    task = "lm"
    teacher_tasks = ("oracle", "arithmetic")
    teacher_options = ("steps", "batch_size", "lr", "train_size", "seed", "threads", "overwrite", "resume", "tokenizer",
                       "model_overrides")
    entry_points = {"recipe": "distill.lm.recipe:LMRecipe",
                    "prepare": "distill.lm.run:prepare",
                    "saved_models": "distill.lm.run:saved_models",
                    "eval_recipe": "distill.lm.evaluation:lone_model_recipe",
                    "evaluate": "distill.lm.evaluation:evaluate_saved",
                    "train_teacher": "distill.lm.train_teacher:train_teacher"}

    def recognizes(self, path: Path) -> bool:
        """A transformers causal LM: config.json naming a *ForCausalLM architecture."""
        config = Path(path) / "config.json"
        if not config.is_file():
            return False
        architectures = json.loads(config.read_text()).get("architectures") or []
        return any(name.endswith("ForCausalLM") for name in architectures)


FAMILY = LMFamily()
