"""The recipe of a diffusion run (`task: diffusion`): a many-step teacher, a student method, the data.

    task: diffusion
    teacher: {path: builtin:gmm2d-teacher}      # a saved denoiser; or {analytic: true} (gmm2d's exact one)
    student: {method: dmd, eval_steps: [1]}     # dmd | consistency | progressive
    data: {builtin: gmm2d, modes: 8, imbalance: 10}
    objective: {divergence: js, fake_updates: 5}
    train: {steps: 2000, batch_size: 128, lr: 5e-4, checkpoint_every: 500}
    eval: {teacher_steps: [1, 2, 4, 8, 16, 32, 64], sampler: euler, every: 250}

A run needs `teacher` and `student`; a recipe without them only evaluates saved denoisers (`distill eval`
of a lone model: no teacher rows, the model sampled as its denoiser.json says).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.core.errors import FieldValueError
from distill.core.recipe import RunRecipe, Seed, StrictModel


class DiffusionTeacherSpec(StrictModel):
    path: str | None = Field(None, description="A saved denoiser (denoiser.json) or builtin:<task>-teacher.")
    analytic: bool = Field(False, description="gmm2d only: the mixture's exact denoiser as the teacher (no "
                                              "teacher error, so distillation error alone is measured).")

    @model_validator(mode="after")
    def _one_source(self) -> "DiffusionTeacherSpec":
        if (self.path is None) == (not self.analytic):
            raise ValueError("give exactly one of `teacher.path` (a trained denoiser) or `teacher.analytic: true`")
        return self


class DiffusionStudentSpec(StrictModel):
    method: Literal["dmd", "consistency", "progressive"] = Field(
        description="dmd: one-step generator by distribution matching; consistency: consistency distillation; "
                    "progressive: progressive distillation (halves the step count each round).")
    eval_steps: list[int] = Field(default_factory=lambda: [1, 2, 4], description="Sampling steps the student is "
                                  "scored at (dmd: 1 only).")

    @model_validator(mode="after")
    def _steps(self) -> "DiffusionStudentSpec":
        if not self.eval_steps or min(self.eval_steps) < 1:
            raise FieldValueError("eval_steps", "give step counts >= 1, e.g. [1, 2, 4]")
        if self.method == "dmd" and self.eval_steps != [1]:
            raise FieldValueError("eval_steps", "a DMD generator is one-step: use eval_steps: [1]")
        return self


class DiffusionDataSpec(StrictModel):
    builtin: Literal["gmm2d", "digits"]
    modes: int = Field(8, ge=2, description="gmm2d: modes on a ring.")
    imbalance: float = Field(10.0, ge=1, description="gmm2d: weight of the commonest mode / the rarest.")
    radius: float = Field(2.0, gt=0)
    std: float = Field(0.05, gt=0, description="gmm2d: each mode's standard deviation.")
    seed: Seed = Field(0, description="Seed of the evaluation samples and (digits) the held-out split.")


def f_divergence_names() -> list[str]:
    """The f-divergences DMD can weigh its gradient with: the registry's `f_divergence` losses."""
    from distill.losses import specs  # importing the package registers every loss

    return [spec.name for spec in specs("f_divergence")]


class DiffusionObjectiveSpec(StrictModel):
    divergence: str = Field("reverse_kl", description="dmd: f-divergence weighting of the generator gradient "
                                                      "(reverse_kl = plain DMD); `distill losses` lists them.")
    fake_updates: int = Field(5, gt=0, description="dmd: fake-score updates per generator update.")
    regression_weight: float = Field(0.0, ge=0, description="dmd: weight of the regression on teacher ODE pairs.")
    gan_weight: float = Field(0.0, ge=0, description="dmd: weight of the non-saturating GAN term (DMD2).")
    discretization: int = Field(18, ge=2, description="consistency: the teacher's grid of noise levels.")
    ema_decay: float = Field(0.95, ge=0, lt=1, description="consistency: the target network's EMA decay.")
    loss: Literal["l2", "pseudo_huber"] = Field("l2", description="consistency: the distance.")
    start_steps: int = Field(64, ge=2, description="progressive: the teacher's DDIM steps; a power of two.")
    ode_method: Literal["euler", "heun", "ddim"] = Field("heun", description="consistency: the teacher's ODE step.")

    @field_validator("divergence")
    @classmethod
    def _registered_divergence(cls, name: str) -> str:
        from distill.losses import LossParameterError, get_spec

        try:
            return get_spec(name, "f_divergence").name  # an alias becomes the canonical name
        except LossParameterError:
            raise ValueError(f"unknown f-divergence `{name}`; use one of: {', '.join(f_divergence_names())}") from None

    @model_validator(mode="after")
    def _power_of_two(self) -> "DiffusionObjectiveSpec":
        if self.start_steps & (self.start_steps - 1):
            raise FieldValueError("start_steps", f"start_steps={self.start_steps} must be a power of two (each "
                                                 "progressive round halves it), e.g. 64")
        return self


class DiffusionTrainSpec(StrictModel):
    steps: int = Field(2000, gt=0, description="dmd: generator updates; consistency: updates; progressive: "
                                               "updates per round.")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(5e-4, gt=0)
    fake_lr: float = Field(5e-4, gt=0, description="dmd: the fake score's (and discriminator's) lr.")
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(40.0, gt=0)
    seed: Seed = 0
    threads: int | None = Field(1, gt=0, le=4096)
    log_every: int = Field(50, gt=0, description="Steps between loss records (losses.jsonl).")
    checkpoint_every: int = Field(500, gt=0, description="Steps between resumable checkpoints (progressive: "
                                                         "counted over all rounds; every round's end has one too).")


class DiffusionEvalSpec(StrictModel):
    samples: int = Field(2000, gt=0, description="Samples per model and step count (digits: at most 500).")
    teacher_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    sampler: Literal["euler", "heun", "ddim"] = Field("euler", description="The teacher's ODE sampler.")
    every: int = Field(250, gt=0, description="Steps between evaluations of the student during training "
                                              "(metrics.jsonl; progressive: also at each round's end).")
    curve_samples: int = Field(500, gt=0, description="Samples of each evaluation during training (at most "
                                                      "eval.samples): a cheaper, noisier score than the rows'.")
    hybrid: list[int] = Field(default_factory=list, description="Also score each student after the teacher's "
                                                                "first step of an N-step schedule, for each N here "
                                                                "(`hybrid-N` rows: diversity distillation, Gandikota "
                                                                "& Bau 2025), e.g. [2, 8].")

    @model_validator(mode="after")
    def _steps(self) -> "DiffusionEvalSpec":
        if self.hybrid and min(self.hybrid) < 2:
            raise FieldValueError("hybrid", f"the teacher's first step must leave noise for the student: schedules "
                                  f"of 2 or more steps, got {self.hybrid}")
        if not self.teacher_steps or min(self.teacher_steps) < 1:
            raise FieldValueError("teacher_steps", f"the samplers take 1 or more steps, got {self.teacher_steps}")
        return self


class DiffusionRecipe(RunRecipe):
    task: Literal["diffusion"] = "diffusion"
    teacher: DiffusionTeacherSpec | None = Field(None, description="Required by a run; a recipe without one "
                                                                   "evaluates saved denoisers alone.")
    student: DiffusionStudentSpec | None = Field(None, description="Required by a run: the method to train.")
    data: DiffusionDataSpec
    objective: DiffusionObjectiveSpec = Field(default_factory=DiffusionObjectiveSpec)
    train: DiffusionTrainSpec = Field(default_factory=DiffusionTrainSpec)
    eval: DiffusionEvalSpec = Field(default_factory=DiffusionEvalSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionRecipe":
        if self.teacher is not None and self.teacher.analytic and self.data.builtin != "gmm2d":
            raise FieldValueError("teacher.analytic", "only gmm2d has an exact denoiser; give teacher.path")
        if self.student is not None and self.student.method == "progressive":
            too_many = [s for s in self.student.eval_steps if s >= self.objective.start_steps]
            if too_many:
                raise FieldValueError("student.eval_steps", f"progressive students have fewer steps than "
                                                            f"objective.start_steps={self.objective.start_steps}")
            if any(s & (s - 1) for s in self.student.eval_steps):
                raise FieldValueError("student.eval_steps", "progressive students have power-of-two step counts")
        if self.train.sigma_min >= self.train.sigma_max:
            raise FieldValueError("train.sigma_min", "sigma_min must be below sigma_max")
        return self
