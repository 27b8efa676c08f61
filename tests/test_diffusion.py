"""task: diffusion end to end: each student method from a recipe through the CLI (tiny sizes), the
shipped gmm2d teacher, denoiser save/load, and the bad inputs refused before training."""
from __future__ import annotations

import json

import pytest
import torch

import distill
from distill.diffusion.models import build_denoiser, load_denoiser, save_denoiser

torch.set_num_threads(1)


def _recipe(tmp_path, method: str, **sections) -> dict:
    recipe = {"name": f"gmm-{method}", "task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
              "student": {"method": method, "eval_steps": [1] if method == "dmd" else [1, 2]},
              "data": {"builtin": "gmm2d"}, "objective": {"start_steps": 4},
              "train": {"steps": 20, "batch_size": 32, "log_every": 5},
              "eval": {"samples": 200, "teacher_steps": [1, 8]}, "output": str(tmp_path / "run")}
    recipe.update(sections)
    return recipe


@pytest.mark.parametrize("method", ["dmd", "consistency", "progressive"])
def test_each_student_method_runs_from_a_recipe(method, tmp_path):
    # Through the CLI: tests/test_cli.py runs recipes/gmm2d-*.yaml; here in-process, with more checks.
    extra = {"objective": {"divergence": "js", "fake_updates": 2, "gan_weight": 0.1, "regression_weight": 0.5}} \
        if method == "dmd" else {}
    distill.run(_recipe(tmp_path, method, **extra))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    names = list(results["rows"])
    assert names[:2] == ["teacher euler 1", "teacher euler 8"] and names[-1] == "data (noise floor)"
    assert [n for n in names if n.startswith("student")] == (
        ["student dmd 1"] if method == "dmd" else [f"student {method} 1", f"student {method} 2"][::-1 if method == "progressive" else 1])
    for row in results["rows"].values():
        assert {"mmd", "modes_covered", "precision", "tv", "rarest_mode_mass", "sliced_wasserstein"} <= row.keys()
    # The shipped teacher at 8 Euler steps finds most modes; at 1 step it collapses to the mean.
    assert results["rows"]["teacher euler 8"]["modes_covered"] >= 6
    assert results["rows"]["teacher euler 1"]["modes_covered"] <= 1
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    model, config = load_denoiser(str(tmp_path / "run" / "student"), "student")
    assert config["method"] == method and model(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)
    if method == "progressive":  # the final (1-step) student, and the 2-step round's under its own name
        assert config["sampling_steps"] == 1
        assert load_denoiser(str(tmp_path / "run" / "student-2-steps"), "s")[1]["sampling_steps"] == 2
    assert (tmp_path / "run" / "plots" / "samples.png").is_file()
    assert (tmp_path / "run" / "plots" / "quality_vs_steps.png").is_file()
    assert "quality_vs_steps.png" in (tmp_path / "run" / "report.md").read_text()


def test_the_student_starts_from_a_copy_of_the_teacher(tmp_path):
    # Training the teacher's own module would move the real score (DMD) and the ODE (consistency) under
    # the student: the first version did, and its consistency students diverged to 1e18.
    from distill.diffusion.data import diffusion_task
    from distill.diffusion.recipe import DiffusionRecipe
    from distill.diffusion.run import _teacher

    recipe = DiffusionRecipe.model_validate(_recipe(tmp_path, "consistency"))
    teacher, start = _teacher(recipe, diffusion_task("gmm2d"))
    teacher_tensors = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_tensors & {p.data_ptr() for p in start.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    for mine, theirs in zip(teacher.state_dict().values(), start.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_analytic_teacher_and_denoiser_round_trip(tmp_path):
    result = distill.run(_recipe(tmp_path, "consistency", teacher={"analytic": True},
                                 eval={"samples": 200, "teacher_steps": [32]}))
    # The exact denoiser with 32 Euler steps is at the noise floor on mode coverage.
    assert result.rows["teacher euler 32"]["modes_covered"] == 8
    model = build_denoiser("conv", (1, 8, 8), 0.5, {"channels": 8, "blocks": 1}, seed=0)
    save_denoiser(model, tmp_path / "saved")
    loaded, config = load_denoiser(str(tmp_path / "saved"), "x")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    assert torch.equal(model(x, sigma), loaded(x, sigma)) and config["arch"] == "conv"


@pytest.mark.parametrize("sections, words", [
    ({"objective": {"divergence": "tvd"}}, ["objective.divergence", "js", "forward_kl"]),
    ({"objective": {"start_steps": 48}}, ["objective.start_steps", "power of two"]),
    ({"eval": {"teacher_steps": [0, 4]}}, ["eval.teacher_steps", "1 or more"]),
    ({"data": {"builtin": "digits"}}, ["teacher.path", "(2,)", "(1, 8, 8)"]),
    ({"data": {"builtin": "gmm2d", "modes": 5}}, ["data", "modes"]),
    ({"student": {"method": "dmd", "eval_steps": [2]}}, ["student.eval_steps", "one-step"]),
])
def test_bad_input_is_refused_before_training(sections, words, tmp_path):
    with pytest.raises(distill.DistillError) as refused:
        distill.run(_recipe(tmp_path, "progressive", **sections))
    for word in words:
        assert word in str(refused.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_bad_recipe_exits_2_through_the_cli(tmp_path, write_recipe, run_cli):
    done = run_cli("run", write_recipe(_recipe(tmp_path, "dmd", objective={"divergence": "tvd"})))
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
