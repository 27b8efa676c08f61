"""task: diffusion end to end: each student method from a recipe through `distill.run` (tiny sizes), killed
and resumed to the same bits, its saved students scored again by the family's `evaluate`; the shipped
gmm2d teacher, denoiser save/load, and the bad inputs refused before anything is written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill
from conftest import assert_same_student
from distill.core.families import get_family
from distill.core.recipe import parse_recipe
from distill.diffusion.models import build_denoiser, load_denoiser, save_denoiser

torch.set_num_threads(1)
METHODS = ("dmd", "consistency", "progressive")
# Checkpoints every 5 steps; progressive's steps run on over its rounds (start_steps 4: rounds of 2 and 1
# steps, 20 updates each), so its crash at step 30 lands inside the second round.
CRASH_AFTER = {"dmd": 10, "consistency": 10, "progressive": 30}
TIMING = ("sample_seconds",)


def diffusion_recipe(output: Path, method: str, **sections) -> dict:
    recipe = {"name": f"gmm-{method}", "task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
              "student": {"method": method, "eval_steps": [1] if method == "dmd" else [1, 2]},
              "data": {"builtin": "gmm2d"}, "objective": {"start_steps": 4},
              "train": {"steps": 20, "batch_size": 32, "log_every": 5, "checkpoint_every": 5},
              "eval": {"samples": 200, "teacher_steps": [1, 8], "every": 10, "curve_samples": 100},
              "output": str(output)}
    if method == "dmd":  # every part of the DMD objective: f-weights, GAN term, regression
        recipe["objective"] = {"divergence": "js", "fake_updates": 2, "gan_weight": 0.1, "regression_weight": 0.5}
    recipe.update(sections)
    return recipe


def without_timing(rows: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in row.items() if k not in TIMING} for name, row in rows.items()}


def records(file: Path) -> list[dict]:
    """A jsonl file's records without their wall-clock fields."""
    lines = file.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """finished(method) -> the RunResult of the method's tiny run, run once per module."""
    runs = {}

    def run(method: str):
        if method not in runs:
            runs[method] = distill.run(diffusion_recipe(tmp_path_factory.mktemp(method) / "run", method))
        return runs[method]
    return run


@pytest.mark.parametrize("method", METHODS)
def test_each_student_method_runs_from_a_recipe(method, finished):
    # Through the CLI: tests/test_cli.py runs recipes/gmm2d-*.yaml; here in-process, with more checks.
    result = finished(method)
    run = Path(result.run_dir)
    for name in ("recipe.yaml", "metrics.jsonl", "losses.jsonl", "results.json", "report.md", "report.html",
                 "plots/loss.png", "plots/eval_metric.png", "plots/samples.png", "plots/quality_vs_steps.png",
                 "student/model.safetensors", "student/denoiser.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["meta"]["primary_metric"] == "mmd" and results["meta"]["higher_is_better"] is False
    names = list(results["rows"])
    assert names[:2] == ["teacher euler 1", "teacher euler 8"] and names[-1] == "data (noise floor)"
    assert [n for n in names if n.startswith("student")] == {
        "dmd": ["student dmd 1"], "consistency": ["student consistency 1", "student consistency 2"],
        "progressive": ["student progressive 2", "student progressive 1"]}[method]  # in round order
    for row in results["rows"].values():
        assert {"mmd", "modes_covered", "precision", "tv", "rarest_mode_mass", "sliced_wasserstein",
                "function_evaluations"} <= row.keys()
    # The shipped teacher at 8 Euler steps finds most modes; at 1 step it collapses to the mean.
    assert results["rows"]["teacher euler 8"]["modes_covered"] >= 6
    assert results["rows"]["teacher euler 1"]["modes_covered"] <= 1
    losses = records(run / "losses.jsonl")
    steps = 40 if method == "progressive" else 20
    assert [r["step"] for r in losses] == list(range(5, steps + 1, 5)) and all(r["phase"] == "student" for r in losses)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    # The eval curve: every eval.every steps (and each progressive round's end), the primary metric included.
    curve = records(run / "metrics.jsonl")
    assert [r["step"] for r in curve] == list(range(10, steps + 1, 10)) and all("mmd" in r for r in curve)
    if method == "progressive":  # each round's student is scored at its own step count
        assert [r["sampling_steps"] for r in curve] == [2, 2, 1, 1]
    model, config = load_denoiser(str(run / "student"), "student")
    assert config["method"] == method and model(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)
    if method == "progressive":  # the final (1-step) student, and the 2-step round's under its own name
        assert config["sampling_steps"] == 1
        assert load_denoiser(str(run / "student-2-steps"), "s")[1]["sampling_steps"] == 2
    report = (run / "report.md").read_text()
    assert "quality_vs_steps.png" in report and "samples.png" in report and "student" in report


@pytest.mark.parametrize("method", METHODS)
def test_killed_and_resumed_run_ends_bit_identical(method, finished, tmp_path, monkeypatch):
    straight = finished(method)
    recipe = diffusion_recipe(tmp_path / "resumed", method)
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", str(CRASH_AFTER[method]))
    with pytest.raises(SystemExit):
        distill.run(recipe)
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    interrupted = records(tmp_path / "resumed" / "losses.jsonl")
    assert interrupted[-1]["step"] == CRASH_AFTER[method]
    if method == "progressive":
        assert interrupted[-1]["student_steps"] == 1  # the second round
    resumed = distill.run(recipe, resume=True)
    assert_same_student(straight.run_dir, resumed.run_dir)
    if method == "progressive":  # the first round's student, saved before the crash
        first, second = (load_file(str(Path(r.run_dir) / "student-2-steps" / "model.safetensors"))
                         for r in (straight, resumed))
        assert all(torch.equal(first[key], second[key]) for key in first)
    assert without_timing(resumed.rows) == without_timing(straight.rows)
    for log in ("losses.jsonl", "metrics.jsonl"):  # the lines after the checkpoint were written once, again
        assert records(tmp_path / "resumed" / log) == records(Path(straight.run_dir) / log), log


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_scores_saved_students_as_the_run_did(method, finished):
    result = finished(method)
    family, run = get_family("diffusion"), Path(result.run_dir)
    recipe = parse_recipe(json.loads((run / "results.json").read_text())["meta"]["recipe"])
    again = family.evaluate(recipe, family.saved_models(run))
    assert without_timing(again.rows) == without_timing(result.rows)
    # A lone student (`distill eval run/student`): no teacher, its method and step counts from denoiser.json.
    lone = parse_recipe(family.eval_recipe(run / "student", None), ["eval.samples=200"])
    assert lone.teacher is None and lone.data == recipe.data
    alone = family.evaluate(lone, {"model": run / "student"})
    assert without_timing(alone.rows)[f"model {method} 1"] == without_timing(result.rows)[f"student {method} 1"]
    assert list(alone.rows)[-1] == "data (noise floor)" and not any(n.startswith("teacher") for n in alone.rows)


def test_the_family_is_registered_and_light():
    family = get_family("diffusion")
    assert family.task == "diffusion" and family.teacher_tasks == ("gmm2d", "digits")
    assert family.recognizes(Path(distill.__file__).parent / "assets" / "gmm2d-teacher")
    code = ("import sys, distill; from distill.core.families import get_family; get_family('diffusion'); "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_student_starts_from_a_copy_of_the_teacher(tmp_path):
    # Training the teacher's own module would move the real score (DMD) and the ODE (consistency) under
    # the student: the first version did, and its consistency students diverged to 1e18.
    from distill.diffusion.data import diffusion_task
    from distill.diffusion.evaluate import load_teacher
    from distill.diffusion.recipe import DiffusionRecipe

    recipe = DiffusionRecipe.model_validate(diffusion_recipe(tmp_path, "consistency"))
    teacher, start = load_teacher(recipe, diffusion_task("gmm2d"))
    teacher_tensors = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_tensors & {p.data_ptr() for p in start.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    for mine, theirs in zip(teacher.state_dict().values(), start.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_analytic_teacher_and_denoiser_round_trip(tmp_path):
    result = distill.run(diffusion_recipe(tmp_path / "run", "consistency", teacher={"analytic": True},
                                          train={"steps": 5, "batch_size": 32},
                                          eval={"samples": 200, "teacher_steps": [32]}))
    # The exact denoiser with 32 Euler steps is at the noise floor on mode coverage.
    assert result.rows["teacher euler 32"]["modes_covered"] == 8
    model = build_denoiser("conv", (1, 8, 8), 0.5, {"channels": 8, "blocks": 1}, seed=0)
    save_denoiser(model, tmp_path / "saved")
    loaded, config = load_denoiser(str(tmp_path / "saved"), "x")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    assert torch.equal(model(x, sigma), loaded(x, sigma)) and config["arch"] == "conv"


def test_the_divergences_are_the_registry_f_divergences(tmp_path):
    from distill.diffusion.recipe import DiffusionRecipe, f_divergence_names
    from distill.losses import specs

    assert f_divergence_names() == [spec.name for spec in specs("f_divergence")]
    for name in f_divergence_names():
        recipe = diffusion_recipe(tmp_path, "dmd", objective={"divergence": name})
        assert DiffusionRecipe.model_validate(recipe).objective.divergence == name


@pytest.mark.parametrize("sections, words", [
    ({"objective": {"divergence": "tvd"}}, ["objective.divergence", "js", "forward_kl", "neyman_chi2"]),
    ({"objective": {"start_steps": 48}}, ["objective.start_steps", "power of two"]),
    ({"eval": {"teacher_steps": [0, 4]}}, ["eval.teacher_steps", "1 or more"]),
    ({"data": {"builtin": "digits"}}, ["teacher.path", "(2,)", "(1, 8, 8)"]),
    ({"data": {"builtin": "gmm2d", "modes": 5}}, ["data", "modes"]),
    ({"student": {"method": "dmd", "eval_steps": [2]}}, ["student.eval_steps", "one-step"]),
    ({"teacher": None}, ["teacher", "needs a teacher"]),
    ({"student": None}, ["student.method"]),
])
def test_bad_input_is_refused_before_training(sections, words, tmp_path):
    with pytest.raises(distill.DistillError) as refused:
        distill.run(diffusion_recipe(tmp_path / "run", "progressive", **sections))
    for word in words:
        assert word in str(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:resuming with a recipe that differs")  # its output moved with the copy
def test_resume_of_a_finished_training_scores_its_saved_students(finished, tmp_path):
    # Killed after training but before results.json: --resume trains nothing and writes the same rows.
    import shutil

    straight = finished("dmd")
    copy = tmp_path / "copy"
    shutil.copytree(straight.run_dir, copy)
    (copy / "results.json").unlink()
    resumed = distill.run(diffusion_recipe(copy, "dmd"), resume=True)
    assert without_timing(resumed.rows) == without_timing(straight.rows)
    assert records(copy / "losses.jsonl") == records(Path(straight.run_dir) / "losses.jsonl")


def test_bad_recipe_exits_2_through_the_cli(tmp_path, write_recipe, run_cli):
    done = run_cli("run", write_recipe(diffusion_recipe(tmp_path / "run", "dmd", objective={"divergence": "tvd"})))
    assert done.returncode == 2 and "objective.divergence" in done.stderr and "Traceback" not in done.stderr


def test_schedule_levels_and_sampling_steps():
    from distill.diffusion.sampler import karras_sigmas
    from distill.diffusion.trainer import Schedule

    schedule = Schedule(0.002, 40.0)
    # Integer positions are the Karras levels consistency distillation steps between; fractions lie between.
    levels = schedule.level(torch.arange(18, dtype=torch.float64), 18)
    torch.testing.assert_close(levels, karras_sigmas(18, 0.002, 40.0)[:-1])
    assert levels[8] > schedule.level(torch.tensor(8.5, dtype=torch.float64), 18) > levels[9]
    # Every sampling step counts: 2 steps go through the Karras midpoint, not through sigma_min.
    assert schedule.sigmas(2)[1] > 1.0 and torch.equal(schedule.sigmas(8)[::2], schedule.sigmas(4))


def test_eval_and_compare_through_the_cli(finished, tmp_path, run_cli):
    consistency, progressive = finished("consistency"), finished("progressive")
    done = run_cli("eval", consistency.run_dir, "--output", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert without_timing(rows) == without_timing(consistency.rows)
    # A lone saved student: scored on the data its denoiser.json names, at its step counts, no teacher.
    lone = run_cli("eval", consistency.run_dir / "student", "--data", "builtin:gmm2d", "--set", "eval.samples=200",
                   "--output", tmp_path / "lone.json")
    assert lone.returncode == 0, lone.stderr[-3000:]
    lone_rows = json.loads((tmp_path / "lone.json").read_text())["rows"]
    assert not any(name.startswith("teacher") for name in lone_rows)
    assert any(name.startswith("model consistency") for name in lone_rows)
    compared = run_cli("compare", consistency.run_dir, progressive.run_dir, "--output", tmp_path / "cmp")
    assert compared.returncode == 0, compared.stderr[-3000:]
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "student consistency 1" in markdown and "student progressive 1" in markdown and " *" in markdown
    assert (tmp_path / "cmp" / "plots" / "eval_curves.png").is_file()
