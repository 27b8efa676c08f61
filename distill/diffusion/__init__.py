"""Diffusion and flow-model distillation (`task: diffusion`): a many-step teacher turned into a one- or
few-step student. The noise convention is EDM's (Karras et al. 2022): x_sigma = x_0 + sigma * eps with
eps ~ N(0, I), a denoiser D(x, sigma) estimates E[x_0 | x_sigma] and the score is
grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2.

    recipe.py     the recipe sections          data.py       the built-in tasks (gmm2d, digits)
    gmm2d.py      2-D mixtures with exact denoisers (an analytic teacher)
    models.py     EDM-preconditioned denoisers, save / load            sampler.py   ODE samplers, schedules
    metrics.py    sample quality (mode coverage, MMD, sliced Wasserstein, Frechet distance, precision/recall)
    trainer.py    dmd, consistency, progressive (and the teacher's denoising loss)
    tracking.py   what a trainer reports to its run: losses, evals, checkpoints
    evaluate.py   scoring saved denoisers (a run's rows and `distill eval`)
    figures.py    the report's sample and quality-vs-steps figures
    run.py        prepare and run a recipe     train_teacher.py  teachers of the built-in tasks

This module stays light (no torch): the family registry imports it to read a recipe.
"""
from __future__ import annotations

from pathlib import Path

from distill.core.families import Family


class DiffusionFamily(Family):
    task = "diffusion"
    teacher_tasks = ("gmm2d", "digits")

    def recipe_class(self):
        from distill.diffusion.recipe import DiffusionRecipe

        return DiffusionRecipe

    def recognizes(self, path: Path) -> bool:
        return (Path(path) / "denoiser.json").is_file()  # models.CONFIG_FILE, without importing torch

    def prepare(self, recipe, run_dir):
        from distill.diffusion.run import prepare

        return prepare(recipe, run_dir)

    def saved_models(self, run_dir: Path) -> dict[str, Path]:
        """`student <method> <steps>` -> the directory of the student scored at that step count."""
        from distill.diffusion.evaluate import saved_models

        return saved_models(run_dir)

    def eval_recipe(self, model: Path, data: str | None) -> dict:
        from distill.diffusion.evaluate import lone_model_recipe

        return lone_model_recipe(model, data)

    def evaluate(self, recipe, models: dict[str, Path]):
        from distill.diffusion.evaluate import evaluate_saved

        return evaluate_saved(recipe, models)

    def train_teacher(self, task: str, out: str, **options) -> dict:
        from distill.diffusion.train_teacher import train_diffusion_teacher

        return train_diffusion_teacher(task.removeprefix("builtin:"), out, **options)


FAMILY = DiffusionFamily()
