"""A diffusion run (`task: diffusion`): the student trained by its method from the many-step teacher,
then the teacher scored at every step count, each saved student at its step counts, and the data's noise
floor, all on the same metrics and from the same noise (distill/diffusion/evaluate.py).

`prepare` loads and checks the data and the teacher (nothing written); `DiffusionJob.run` trains
(resuming from the run directory's checkpoints if asked), saves the students (`student/`; progressive
also `student-<N>-steps/` for each scored round) and scores them from disk, as `distill eval` would.
The skeleton around it is core's (`core.run.run_recipe`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from distill.core.errors import DistillError
from distill.core.families import Job
from distill.core.rundir import RunDirectory, RunResult
from distill.diffusion.evaluate import (STUDENT_DIR, Scorer, diffusion_meta, load_teacher, saved_models,
                                        task_of)
from distill.diffusion.figures import plot_quality_vs_steps, plot_samples
from distill.diffusion.models import CONFIG_FILE, save_denoiser
from distill.diffusion.recipe import DiffusionRecipe
from distill.diffusion.tracking import Tracker
from distill.diffusion.trainer import (ConsistencyModel, ConsistencySpec, DMDSpec, ProgressiveSpec, train_consistency,
                                       train_dmd, train_progressive)

PHASE = "student"  # the one training phase: its losses, evals and checkpoints


def prepare(recipe: DiffusionRecipe, run_dir: RunDirectory) -> "DiffusionJob":
    """The data and the teacher loaded, and checked against each other. Nothing written."""
    if recipe.teacher is None:
        raise DistillError("a run needs a teacher", field="teacher",
                           fix="give teacher.path (a saved denoiser, e.g. builtin:gmm2d-teacher) or, for gmm2d, "
                               "teacher.analytic: true")
    if recipe.student is None:
        raise DistillError("a run needs a student method", field="student.method",
                           fix="give student: {method: dmd | consistency | progressive}")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    task = task_of(recipe)
    teacher, network = load_teacher(recipe, task)
    return DiffusionJob(recipe, task, teacher, network)


class DiffusionJob(Job):
    """A prepared diffusion run (see the module docstring)."""

    def __init__(self, recipe: DiffusionRecipe, task, teacher, network: torch.nn.Module):
        self.recipe, self.task, self.teacher, self.network = recipe, task, teacher, network
        self.scorer = Scorer(recipe, task)
        self.rows: dict[str, dict] = {}
        self.started = time.perf_counter()

    def run(self, run_dir: RunDirectory) -> RunResult:
        recipe, scorer = self.recipe, self.scorer
        train_seconds, notes = 0.0, []
        if run_dir.resume and (run_dir.path / STUDENT_DIR / CONFIG_FILE).is_file():
            notes.append("Training had finished before this run was resumed: its saved students are scored.")
        else:
            clock = time.perf_counter()
            self.train(run_dir)
            train_seconds = time.perf_counter() - clock
        rows = scorer.rows("teacher", self.teacher, None, recipe.eval.teacher_steps)
        rows.update(scorer.saved_rows(saved_models(run_dir.path)))  # from disk, as `distill eval` scores them
        if recipe.eval.hybrid:  # the teacher's first step, then the student (diversity distillation)
            rows.update(scorer.hybrid_rows(self.teacher, saved_models(run_dir.path)))
            notes.append("`hybrid-N` rows: the teacher takes the first step of an N-step schedule (one Euler step "
                         "from sigma_max), the student its own steps from there (Gandikota & Bau 2025, diversity "
                         "distillation); NFE counts both.")
        rows.update(scorer.noise_floor())
        self.rows = rows
        meta = diffusion_meta(recipe, self.task)
        if recipe.student.method == "progressive":
            notes.append("The eval curve scores each round's student at its own step count (sampling_steps in "
                         "metrics.jsonl): its best value may be an early round's, with more steps.")
        meta["notes"] = meta["notes"] + notes + [f"{train_seconds:.0f} s training ({recipe.student.method})."]
        meta.update(seconds=time.perf_counter() - self.started, train_seconds=train_seconds)
        return RunResult(run_dir.path, rows, meta)

    def train(self, run_dir: RunDirectory) -> None:
        """Train the student by the recipe's method and save it (and progressive's scored rounds)."""
        recipe, task, scorer = self.recipe, self.task, self.scorer
        train, objective, method = recipe.train, recipe.objective, recipe.student.method
        eval_steps, schedule = recipe.student.eval_steps, scorer.schedule

        def curve(model, sampling_steps: int | None) -> dict:
            return scorer.curve_point(model, method, sampling_steps or min(eval_steps))
        tracker = Tracker(PHASE, run_dir=run_dir, log_every=train.log_every, eval_every=recipe.eval.every,
                          evaluate=curve, checkpoint_every=train.checkpoint_every, resume=run_dir.resume)
        network = self.network.requires_grad_(True)
        if method == "dmd":
            student = train_dmd(self.teacher, network, task.sample, DMDSpec(
                divergence=objective.divergence, steps=train.steps, batch_size=train.batch_size, lr=train.lr,
                fake_lr=train.fake_lr, fake_updates=objective.fake_updates,
                regression_weight=objective.regression_weight, gan_weight=objective.gan_weight, seed=train.seed),
                schedule, tracker=tracker)
            self.save(student, run_dir.path / STUDENT_DIR, eval_steps=[1], sampling_steps=1)
        elif method == "consistency":
            student = train_consistency(self.teacher, ConsistencyModel(network, schedule.sigma_min), task.sample,
                                        ConsistencySpec(steps=train.steps, batch_size=train.batch_size, lr=train.lr,
                                                        discretization=objective.discretization,
                                                        ema_decay=objective.ema_decay, loss=objective.loss,
                                                        ode_method=objective.ode_method, seed=train.seed),
                                        schedule, tracker=tracker)
            self.save(student.denoiser, run_dir.path / STUDENT_DIR, eval_steps=eval_steps,
                      consistency_sigma_min=schedule.sigma_min)
        else:
            final = min(eval_steps)

            def keep(steps: int, model) -> None:  # each scored round's student samples at its own step count
                if steps in eval_steps and steps != final:
                    self.save(model, run_dir.path / f"{STUDENT_DIR}-{steps}-steps", eval_steps=[steps],
                              sampling_steps=steps)
            student = train_progressive(self.teacher, task.sample, ProgressiveSpec(
                start_steps=objective.start_steps, final_steps=final, steps_per_round=train.steps,
                batch_size=train.batch_size, lr=train.lr, seed=train.seed), schedule, student=network,
                tracker=tracker, keep=keep)
            self.save(student, run_dir.path / STUDENT_DIR, eval_steps=[final], sampling_steps=final)

    def save(self, model: torch.nn.Module, directory: Path, **extra) -> None:
        """The denoiser and what scoring it alone needs (denoiser.json): method, data, noise range, step counts."""
        recipe = self.recipe
        save_denoiser(model, directory, {"task": recipe.data.builtin, "method": recipe.student.method,
                                         "data": recipe.data.model_dump(mode="json"),
                                         "sigma_min": recipe.train.sigma_min, "sigma_max": recipe.train.sigma_max,
                                         **extra})

    def figures(self, plots_dir: Path) -> list[Path]:
        """Every row's samples side by side, and quality against network evaluations."""
        plots = [plot_samples(self.scorer.samples, self.task, plots_dir / "samples.png"),
                 plot_quality_vs_steps(self.rows, self.task.primary_metric, plots_dir / "quality_vs_steps.png")]
        return [plot for plot in plots if plot is not None]
