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

from distill.core.families import Family


class DiffusionFamily(Family):
    task = "diffusion"
    teacher_tasks = ("gmm2d", "digits")
    teacher_options = ("steps", "seed", "threads", "overwrite")
    model_file = "denoiser.json"  # models.CONFIG_FILE, without importing torch
    # saved_models: `student <method> <steps>` -> the directory of the student scored at that step count.
    entry_points = {"recipe": "distill.diffusion.recipe:DiffusionRecipe",
                    "prepare": "distill.diffusion.run:prepare",
                    "saved_models": "distill.diffusion.evaluate:saved_models",
                    "eval_recipe": "distill.diffusion.evaluate:lone_model_recipe",
                    "evaluate": "distill.diffusion.evaluate:evaluate_saved",
                    "train_teacher": "distill.diffusion.train_teacher:train_diffusion_teacher"}


FAMILY = DiffusionFamily()
