"""Diffusion runs (`distill run` with `task: diffusion`): the teacher scored at every step count, the
student trained by its method and scored at its step counts, and the data-vs-data noise floor, on the
same metrics; results.json, report.md / report.html with sample plots, the student in `student/`."""
from __future__ import annotations

import base64
import copy
import html
import json
import time
from pathlib import Path

import torch

from distill.diffusion.data import diffusion_task
from distill.diffusion.models import build_denoiser, load_denoiser, save_denoiser
from distill.diffusion.recipe import DiffusionRecipe
from distill.diffusion.sampler import sample_ode
from distill.core.errors import DistillError
from distill.diffusion.trainer import (ConsistencyModel, ConsistencySpec, DMDSpec, Log, ProgressiveSpec, Schedule,
                                     consistency_sample, one_step, train_consistency, train_dmd, train_progressive)


def _teacher(recipe: DiffusionRecipe, task):
    """(teacher denoiser, a network to start students from)."""
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


def run_diffusion(recipe: DiffusionRecipe, *, resume: bool = False, overwrite: bool = False):
    from distill.core.rundir import RunResult, prepare_output_dir

    if resume:
        raise DistillError("diffusion runs do not resume", field="--resume", fix="run again with --overwrite")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    started = time.perf_counter()
    run_dir = recipe.output_dir
    prepare_output_dir(run_dir, resume=False, overwrite=overwrite, is_main=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    task = diffusion_task(recipe.data.builtin, modes=recipe.data.modes, imbalance=recipe.data.imbalance,
                          radius=recipe.data.radius, std=recipe.data.std, eval_samples=recipe.eval.samples,
                          seed=recipe.data.seed)
    teacher, network = _teacher(recipe, task)
    schedule = Schedule(recipe.train.sigma_min, recipe.train.sigma_max)
    z = torch.randn((recipe.eval.samples, *task.data_shape), generator=torch.Generator().manual_seed(recipe.data.seed))
    rows, samples = {}, {}

    def score(name: str, x: torch.Tensor, seconds: float, evaluations: int) -> None:
        rows[name] = {**task.evaluate(x), "function_evaluations": evaluations, "sample_seconds": seconds}
        samples[name] = x

    for steps in recipe.eval.teacher_steps:
        clock = time.perf_counter()
        with torch.no_grad():
            x = sample_ode(teacher, z, schedule.sigmas(steps), recipe.eval.sampler)
        evaluations = steps if recipe.eval.sampler != "heun" else 2 * steps - 1
        score(f"teacher {recipe.eval.sampler} {steps}", x, time.perf_counter() - clock, evaluations)
    losses = run_dir / "losses.jsonl"

    def write(record: dict) -> None:
        with open(losses, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    log = Log("student", every=recipe.train.log_every, sink=write)
    train, objective, method = recipe.train, recipe.objective, recipe.student.method
    train_started = time.perf_counter()
    if method == "dmd":
        student = train_dmd(teacher, network.requires_grad_(True), task.sample, DMDSpec(
            divergence=objective.divergence, steps=train.steps, batch_size=train.batch_size, lr=train.lr,
            fake_lr=train.fake_lr, fake_updates=objective.fake_updates, regression_weight=objective.regression_weight,
            gan_weight=objective.gan_weight, seed=train.seed), schedule, log=log)
        clock = time.perf_counter()
        with torch.no_grad():
            x = one_step(student, z, schedule.sigma_max)
        score("student dmd 1", x, time.perf_counter() - clock, 1)
        saved = student
    elif method == "consistency":
        student = train_consistency(teacher, ConsistencyModel(network.requires_grad_(True), schedule.sigma_min),
                                    task.sample, ConsistencySpec(
                                        steps=train.steps, batch_size=train.batch_size, lr=train.lr,
                                        discretization=objective.discretization, ema_decay=objective.ema_decay,
                                        loss=objective.loss, ode_method=objective.ode_method, seed=train.seed),
                                    schedule, log=log)
        for steps in recipe.student.eval_steps:
            clock = time.perf_counter()
            x = consistency_sample(student, z, steps, schedule, torch.Generator().manual_seed(recipe.data.seed + 1))
            score(f"student consistency {steps}", x, time.perf_counter() - clock, steps)
        saved = student.denoiser
    else:
        def keep(steps: int, model) -> None:
            if steps in recipe.student.eval_steps:
                clock = time.perf_counter()
                with torch.no_grad():
                    x = sample_ode(model, z, schedule.sigmas(steps), "ddim")
                score(f"student progressive {steps}", x, time.perf_counter() - clock, steps)
                if steps != min(recipe.student.eval_steps):  # each round's student samples at its own step count
                    save_denoiser(model, run_dir / f"student-{steps}-steps", {
                        "task": recipe.data.builtin, "method": method, "sampling_steps": steps})
        student = train_progressive(teacher, task.sample, ProgressiveSpec(
            start_steps=objective.start_steps, final_steps=min(recipe.student.eval_steps), steps_per_round=train.steps,
            batch_size=train.batch_size, lr=train.lr, seed=train.seed), schedule,
            student=network if recipe.teacher.analytic else None, log=log, keep=keep)
        saved = student
    train_seconds = time.perf_counter() - train_started
    rows["data (noise floor)"] = {**task.noise_floor(), "function_evaluations": 0, "sample_seconds": 0.0}
    save_denoiser(saved, run_dir / "student", {"task": recipe.data.builtin, "method": method,
                                               **({"consistency_sigma_min": schedule.sigma_min}
                                                  if method == "consistency" else {}),
                                               **({"sampling_steps": min(recipe.student.eval_steps)}
                                                  if method == "progressive" else {})})
    extras = {"seconds": time.perf_counter() - started, "train_seconds": train_seconds,
              "recipe": recipe.model_dump(mode="json"), "world_size": 1}
    result = RunResult(run_dir, rows, task.primary_metric, False, extras)
    write_diffusion_report(result, samples, task)
    return result


def _table(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in dict.fromkeys(k for row in rows.values() for k in row) if not k.endswith("_std")
            and k not in ("num_modes", "rarest_mode_weight", "num_seeds")]
    body = [[name] + [(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "-"))) for k in keys]
            for name, row in rows.items()]
    return ["model"] + keys, body


def _plot(samples: dict[str, torch.Tensor], task, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    columns = min(len(names), 5)
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        x = samples[name]
        if x.dim() == 2:
            means = task.mixture.means
            axis.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            axis.scatter(means[:, 0], means[:, 1], s=12, c="red", marker="x")
            axis.set_xlim(-3, 3)
            axis.set_ylim(-3, 3)
        else:
            tiles = torch.nn.functional.pad((x[:36, 0].clamp(-1, 1) + 1) / 2, (1, 1, 1, 1))  # a blank border each
            grid = tiles.reshape(6, 6, *tiles.shape[1:]).permute(0, 2, 1, 3).reshape(6 * tiles.shape[1], -1)
            axis.imshow(grid, cmap="gray_r")
            axis.axis("off")
        axis.set_title(name, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _family(name: str) -> str:
    """`teacher euler 8` -> `teacher euler`; `student consistency 2` -> `student consistency`."""
    return name.rsplit(" ", 1)[0]


def _plot_steps(rows: dict[str, dict], metric: str, path: Path) -> None:
    """The primary metric against sampling steps (network evaluations), a line per model family, the
    noise floor (exact data against exact data) as a dashed line: where the students meet the teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    families: dict[str, list[tuple[int, float]]] = {}
    for name, row in rows.items():
        if row.get("function_evaluations"):
            families.setdefault(_family(name), []).append((row["function_evaluations"], row[metric]))
    for family, points in families.items():
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    floor = next((row[metric] for name, row in rows.items() if name.startswith("data")), None)
    if floor is not None:
        axis.axhline(floor, color="gray", linestyle="--", label="data (noise floor)")
    axis.set_xscale("log", base=2)
    values = [v for points in families.values() for _, v in points] + ([floor] if floor is not None else [])
    if min(values) > 0:  # an unbiased MMD can dip below 0 at the noise floor: then a linear axis
        axis.set_yscale("log")
    axis.set_xlabel("network evaluations per sample")
    axis.set_ylabel(f"{metric} (lower is better)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_diffusion_report(result, samples: dict[str, torch.Tensor], task) -> None:
    run_dir = Path(result.run_dir)
    (run_dir / "plots").mkdir(exist_ok=True)
    plot = run_dir / "plots" / "samples.png"
    _plot(samples, task, plot)
    steps_plot = run_dir / "plots" / "quality_vs_steps.png"
    _plot_steps(result.rows, result.primary_metric, steps_plot)
    header, body = _table(result.rows)
    name = result.extras["recipe"]["name"]
    lines = [f"# distill run `{name}` (diffusion, {task.name})", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", f"{result.extras['seconds']:.0f} s in all, {result.extras['train_seconds']:.0f} s training. "
              f"Primary metric {result.primary_metric} (lower is better). Every model samples from the same noise.",
              "", "![samples](plots/samples.png)", "", "![quality against steps](plots/quality_vs_steps.png)"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(file.read_bytes()).decode()}'>"
                     for alt, file in (("samples", plot), ("quality against steps", steps_plot)))
    (run_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>distill: {html.escape(name)}</title></head><body>"
        f"<h1>distill run {html.escape(name)}</h1><table border=1><tr>{cells}</tr>{body_html}</table>"
        f"{images}</body></html>\n")
    results = {"rows": result.rows, "primary_metric": result.primary_metric, "higher_is_better": False,
               **result.extras}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
