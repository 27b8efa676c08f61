"""Scoring denoisers the same way in a run and in `distill eval`: every model samples from the same noise
(eval.samples draws seeded by data.seed) and is scored by the task's metrics (gmm2d: MMD, mode coverage,
...; digits: Frechet distance, precision / recall), one row per model and step count.

Rows are named `<who> <how> <steps>`: `teacher euler 8` (the recipe's teacher with eval.sampler),
`student consistency 2` (a saved student with its method), and `data (noise floor)` (exact data scored
against exact data: what a perfect generator scores). A finished run's saved students are found by
`saved_models` under the same names, so `evaluate_saved(recipe, saved_models(run))` gives the run's rows.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from distill.core.errors import DistillError
from distill.core.rundir import RunResult
from distill.diffusion.data import diffusion_task
from distill.diffusion.models import CONFIG_FILE, build_denoiser, load_denoiser
from distill.diffusion.recipe import DiffusionDataSpec, DiffusionRecipe
from distill.diffusion.sampler import function_evaluations, ode_step, sample_ode
from distill.diffusion.trainer import ConsistencyModel, Schedule, consistency_sample, one_step

TASKS = ("gmm2d", "digits")
STUDENT_DIR = "student"  # the final student; progressive runs also keep `student-<N>-steps/` per scored round
FLOOR_ROW = "data (noise floor)"


def task_of(recipe: DiffusionRecipe):
    """The task object (data sampler and metrics) of the recipe's `data` section."""
    data = recipe.data
    return diffusion_task(data.builtin, modes=data.modes, imbalance=data.imbalance, radius=data.radius, std=data.std,
                          eval_samples=recipe.eval.samples, seed=data.seed)


def schedule_of(recipe: DiffusionRecipe) -> Schedule:
    return Schedule(recipe.train.sigma_min, recipe.train.sigma_max)


def load_teacher(recipe: DiffusionRecipe, task):
    """(teacher denoiser, a network to start students from), checked against the recipe's data."""
    if recipe.teacher.analytic:
        mixture = task.mixture

        def exact(x, sigma):
            return mixture.denoiser(x, sigma).to(x.dtype)
        network = build_denoiser("mlp", task.data_shape, task.sigma_data, seed=recipe.train.seed)
        return exact, network
    model, config = load_denoiser(recipe.teacher.path, "teacher.path")
    if tuple(config["data_shape"]) != tuple(task.data_shape):
        raise DistillError(f"the teacher denoises data of shape {tuple(config['data_shape'])} but {recipe.data.builtin} "
                           f"is {tuple(task.data_shape)}", field="teacher.path",
                           fix="use a teacher trained on this task (`distill train-teacher builtin:<task>`)")
    if config.get("task") not in (None, recipe.data.builtin):
        raise DistillError(f"the teacher was trained on `{config['task']}`, the data is `{recipe.data.builtin}`",
                           field="teacher.path", fix="use a teacher trained on this task")
    if config.get("mixture") and recipe.data.builtin == "gmm2d":
        wanted = {k: getattr(recipe.data, k) for k in ("modes", "imbalance", "radius", "std")}
        if {k: config["mixture"][k] for k in wanted} != wanted:
            raise DistillError(f"the teacher was trained on the mixture {config['mixture']}, the recipe asks for "
                               f"{wanted}", field="data", fix="match data.modes / imbalance / radius / std to the teacher")
    # The student starts from a copy: training the teacher's own module would move the real score (DMD) and
    # the ODE the student distils (consistency) while the student learns from them.
    return model.requires_grad_(False), copy.deepcopy(model)


def load_saved(path: str | Path, task, field: str = "MODEL"):
    """(a saved denoiser ready to sample as its method says, its denoiser.json): a consistency student is
    wrapped in its consistency parametrisation again."""
    model, config = load_denoiser(str(path), field)
    if tuple(config["data_shape"]) != tuple(task.data_shape):
        raise DistillError(f"`{path}` denoises data of shape {tuple(config['data_shape'])} but {task.name} is "
                           f"{tuple(task.data_shape)}", field="data.builtin",
                           fix="score it on the data it was trained on")
    if config.get("method") == "consistency":
        model = ConsistencyModel(model, config["consistency_sigma_min"]).eval()
    return model.requires_grad_(False), config


# ---- row names ------------------------------------------------------------------------------------

def row_name(who: str, how: str, steps: int) -> str:
    return f"{who} {how} {steps}"


def parse_row_name(name: str) -> tuple[str, str, int] | None:
    """`student consistency 2` -> ("student", "consistency", 2); None for a name of another form."""
    parts = name.rsplit(" ", 2)
    if len(parts) == 3 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    return None


def saved_models(run_dir: Path) -> dict[str, Path]:
    """Row name -> directory of every student a finished run saved (`student/`, and progressive's
    `student-<N>-steps/`), one row per step count it is scored at."""
    run_dir = Path(run_dir)
    final = run_dir / STUDENT_DIR / CONFIG_FILE
    if not final.is_file():
        return {}
    config = json.loads(final.read_text())
    method = config["method"]
    if method != "progressive":  # one model, scored at every step count of the recipe
        return {row_name("student", method, steps): run_dir / STUDENT_DIR for steps in config["eval_steps"]}
    rounds = {json.loads(file.read_text())["sampling_steps"]: file.parent
              for file in run_dir.glob(f"{STUDENT_DIR}-*-steps/{CONFIG_FILE}")}
    rounds[config["sampling_steps"]] = run_dir / STUDENT_DIR
    return {row_name("student", method, steps): rounds[steps] for steps in sorted(rounds, reverse=True)}


# ---- scoring ------------------------------------------------------------------------------------------

class Scorer:
    """Samples and scores models on the recipe's task, all from the same noise; keeps every row's samples
    (for the report's figures)."""

    def __init__(self, recipe: DiffusionRecipe, task):
        self.recipe, self.task, self.schedule = recipe, task, schedule_of(recipe)
        self.noise = torch.randn((recipe.eval.samples, *task.data_shape),
                                 generator=torch.Generator().manual_seed(recipe.data.seed))
        self.samples: dict[str, torch.Tensor] = {}

    def how(self, method: str | None) -> str:
        """What a row name says about the sampling: the student's method, or the ODE sampler of a many-step
        denoiser (method None)."""
        return method or self.recipe.eval.sampler

    @torch.no_grad()
    def sample(self, model, method: str | None, steps: int, noise: torch.Tensor) -> torch.Tensor:
        schedule = self.schedule
        if method is None:
            return sample_ode(model, noise, schedule.sigmas(steps), self.recipe.eval.sampler)
        if method == "dmd":
            return one_step(model, noise, schedule.sigma_max)
        if method == "consistency":  # re-noising between steps draws from its own seeded generator
            return consistency_sample(model, noise, steps, schedule,
                                      torch.Generator().manual_seed(self.recipe.data.seed + 1))
        return sample_ode(model, noise, schedule.sigmas(steps), "ddim")  # progressive

    def rows(self, who: str, model, method: str | None, steps_list) -> dict[str, dict]:
        """One row per step count: the task's metrics, network evaluations and sampling seconds."""
        rows = {}
        for steps in steps_list:
            name = row_name(who, self.how(method), steps)
            clock = time.perf_counter()
            x = self.sample(model, method, steps, self.noise)
            seconds = time.perf_counter() - clock
            self.samples[name] = x
            evaluations = function_evaluations(steps, self.recipe.eval.sampler) if method is None else steps
            rows[name] = {**self.task.evaluate(x), "function_evaluations": evaluations, "sample_seconds": seconds}
        return rows

    @torch.no_grad()
    def hybrid_sample(self, teacher, student, method: str, steps: int, levels: int, noise: torch.Tensor) -> torch.Tensor:
        """The hybrid sampler of "Distilling Diversity and Control in Diffusion Models" (Gandikota & Bau 2025):
        the teacher takes the first step of its `levels`-step schedule (one Euler step from sigma_max down to
        sigma_1, the early step where a sample's mode is decided), then the student takes its `steps` steps
        from sigma_1 on a schedule of the same spacing (dmd and progressive: DDIM with the student as denoiser,
        which for one step is one student call at sigma_1; consistency: its multistep rule)."""
        schedule = self.schedule
        first = float(schedule.sigmas(levels)[1])
        x = ode_step(teacher, noise * schedule.sigma_max, schedule.sigma_max, first, "euler")
        rest = Schedule(schedule.sigma_min, first, schedule.rho)  # sigma_1 ... 0, the same spacing
        if method == "consistency":  # the scorer's own multistep rule and re-noising seed, from sigma_1
            return consistency_sample(student, x / first, steps, rest,
                                      torch.Generator().manual_seed(self.recipe.data.seed + 1))
        return sample_ode(student, x / first, rest.sigmas(steps), "ddim")

    def hybrid_rows(self, teacher, models: dict[str, Path]) -> dict[str, dict]:
        """`hybrid-<N> <method> <steps>` rows beside each saved student row, one per N of eval.hybrid."""
        rows = {}
        for name, path in models.items():
            parsed = parse_row_name(name)
            if parsed is None:
                continue
            model, config = load_saved(path, self.task)
            method, steps = config.get("method"), parsed[2]
            for levels in self.recipe.eval.hybrid:
                hybrid = row_name(f"hybrid-{levels}", self.how(method), steps)
                clock = time.perf_counter()
                x = self.hybrid_sample(teacher, model, method, steps, levels, self.noise)
                seconds = time.perf_counter() - clock
                self.samples[hybrid] = x
                rows[hybrid] = {**self.task.evaluate(x), "function_evaluations": steps + 1, "sample_seconds": seconds}
        return rows

    def curve_point(self, model, method: str, steps: int) -> dict:
        """An evaluation during training: the task's metrics on the first eval.curve_samples noise draws."""
        x = self.sample(model, method, steps, self.noise[:self.recipe.eval.curve_samples])
        return {"sampling_steps": steps, **self.task.evaluate(x)}

    def noise_floor(self) -> dict[str, dict]:
        return {FLOOR_ROW: {**self.task.noise_floor(), "function_evaluations": 0, "sample_seconds": 0.0}}

    def saved_rows(self, models: dict[str, Path]) -> dict[str, dict]:
        """The rows of saved denoisers. A name `<who> <method> <steps>` matching the model's method is that one
        row; any other name (a lone model) gets a row per step count: the recipe's student.eval_steps (dmd: 1;
        none in the recipe: those in the model's denoiser.json), or eval.teacher_steps for a denoiser without
        a student method (a teacher), sampled with eval.sampler."""
        rows = {}
        for name, path in models.items():
            model, config = load_saved(path, self.task)
            method = config.get("method")
            parsed = parse_row_name(name)
            if parsed is not None and parsed[1] == self.how(method):
                who, steps_list = parsed[0], [parsed[2]]
            elif method is None:
                who, steps_list = name, self.recipe.eval.teacher_steps
            elif method == "dmd":
                who, steps_list = name, [1]
            else:
                who = name
                steps_list = self.recipe.student.eval_steps if self.recipe.student else config["eval_steps"]
            rows.update(self.rows(who, model, method, steps_list))
        return rows


def diffusion_meta(recipe: DiffusionRecipe, task) -> dict:
    """What the rows mean (results.json `meta`)."""
    notes = []
    if hasattr(task, "mixture"):
        mixture = task.mixture
        notes.append(f"gmm2d: {mixture.num_modes} modes, the rarest of weight "
                     f"{float(mixture.weights[mixture.rarest_mode]):.4f} (rarest_mode_mass of a perfect sampler).")
    floor = ("exact mixture samples against exact samples" if task.name == "gmm2d"
             else "training digits against the held-out ones")
    return {"primary_metric": task.primary_metric, "higher_is_better": False, "world_size": 1, "notes": notes,
            "hidden_columns": ["num_modes", "rarest_mode_weight"],  # properties of the data, the same in every row
            "directions": {"modes_covered": "higher", "tv": "lower", "rarest_mode_mass": None},
            "rows_note": f"Every model samples from the same {recipe.eval.samples} noise draws; the noise floor "
                         f"row scores {floor}: what a perfect generator scores."}


# ---- `distill eval` --------------------------------------------------------------------------------

def lone_model_recipe(model: Path, data: str | None) -> dict:
    """A recipe evaluating the saved denoiser `model` alone on `data` (`builtin:gmm2d` / `builtin:digits`;
    None: the task in its denoiser.json, with the data options it was trained on): no teacher, the model's
    method and step counts (a denoiser without a method, a teacher, at eval.teacher_steps), its noise range.
    `output` is a placeholder: evaluating writes no run directory."""
    model = Path(model)
    config = json.loads((model / CONFIG_FILE).read_text())
    trained_on = config.get("task")
    task = data.removeprefix("builtin:") if data is not None else trained_on
    if task not in TASKS or (data is not None and not data.startswith("builtin:")):
        raise DistillError(f"no built-in diffusion data `{data if data is not None else trained_on}`", field="--data",
                           fix=f"pass --data {' or '.join('builtin:' + t for t in TASKS)}")
    section = {"builtin": task}
    if task == trained_on:  # a student records its data section, a gmm2d teacher its mixture
        recorded = config.get("data") or config.get("mixture") or {}
        section.update({k: v for k, v in recorded.items() if k in DiffusionDataSpec.model_fields and k != "builtin"})
    recipe = {"task": "diffusion", "name": f"eval-{model.name}", "data": section, "output": f"runs/eval-{model.name}"}
    method = config.get("method")
    if method is not None:
        steps = config.get("eval_steps") or [config.get("sampling_steps", 1)]
        recipe["student"] = {"method": method, "eval_steps": steps}
        if method == "progressive":  # its step counts must lie below the (unused) start_steps
            recipe["objective"] = {"start_steps": max(64, 2 * max(steps))}
    if "sigma_min" in config:
        recipe["train"] = {"sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"]}
    return recipe


def evaluate_saved(recipe: DiffusionRecipe, models: dict[str, Path]) -> RunResult:
    """The rows a run reports for these saved denoisers (row name -> directory; see Scorer.saved_rows): the
    teacher's rows first when the recipe has a teacher, then the models', then the noise floor. Nothing trains."""
    started = time.perf_counter()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    task = task_of(recipe)
    scorer = Scorer(recipe, task)
    rows = {}
    if recipe.teacher is not None:
        teacher, _ = load_teacher(recipe, task)
        rows.update(scorer.rows("teacher", teacher, None, recipe.eval.teacher_steps))
    rows.update(scorer.saved_rows(models))
    rows.update(scorer.noise_floor())
    return RunResult(None, rows, {**diffusion_meta(recipe, task), "seconds": time.perf_counter() - started})
