"""On-policy distillation as RL (regime opd): per-token teacher reward on student samples, reward
extrapolation, verifiable sequence rewards with group baselines; the pure loss by hand, the
regime end to end, exact resume, and bad reward functions refused before training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_same_student, run_interrupted_and_resumed
from distill.losses.policy import group_advantages, opd_loss, opd_token_rewards
from distill.lm.tasks.arithmetic import format_problem, reward


def test_token_rewards_by_hand():
    student, teacher, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -3.0]), torch.tensor([-1.5, -2.5])
    # scale 1: lp_T - lp_S (the reference cancels)
    torch.testing.assert_close(opd_token_rewards(student, teacher, reference, 1.0), torch.tensor([0.5, -1.0]))
    # scale 2: 2 (lp_T - lp_ref) - (lp_S - lp_ref) = [2*1 - 0.5, 2*(-0.5) - 0.5]
    torch.testing.assert_close(opd_token_rewards(student, teacher, reference, 2.0), torch.tensor([1.5, -1.5]))
    with pytest.raises(ValueError, match="reference"):
        opd_token_rewards(student, teacher, None, 2.0)


def test_group_advantages_centre_each_group():
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_opd_loss_gradient_is_reinforce_with_the_advantage():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    tokens = torch.tensor([[1, 2, 3], [4, 0, 1]])
    student = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    teacher = torch.full((2, 3), math.log(0.25), dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, parts = opd_loss(student, teacher, mask, sequence_advantages=advantages, reward_weight=0.5)
    weights = (teacher - student.detach() + 0.5 * advantages[:, None]) * mask
    expected = -(weights * student).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits, retain_graph=True)[0],
                               torch.autograd.grad(expected, logits)[0])
    assert parts["reverse_kl"] == pytest.approx(float(((student.detach() - teacher) * mask).sum() / mask.sum()))


def test_arithmetic_reward_checks_the_sum():
    problem = format_problem(1234, 8766)
    assert reward([problem["prompt"]] * 3, [problem["completion"], "0 0 0 0 0", "garbage"]) == [1.0, 0.0, 0.0]


def _arithmetic_opd(tmp_path, **regime):
    return {"teacher": {"path": "builtin:arithmetic-teacher"},
            "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 64}},
            "data": {"builtin": "arithmetic", "train_size": 16, "eval_size": 4},
            "regime": {"kind": "opd", **regime},
            "train": {"steps": 4, "batch_size": 4, "threads": 1, "checkpoint_every": 2, "log_every": 1,
                      "baseline": False},
            "eval": {"every": 2, "batch_size": 4, "generate_size": 2, "throughput_tokens": 2},
            "output": str(tmp_path / "run")}


def test_opd_with_extrapolation_and_a_verifiable_reward_runs_through_the_cli(write_recipe, run_cli, tmp_path):
    recipe = write_recipe(_arithmetic_opd(tmp_path, scale=1.25, reward="builtin", group_size=2))
    done = run_cli("run", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["sampled_batches"] == 1 and record["generated_tokens"] > 0
        assert 0.0 <= record["sequence_reward"] <= 1.0 and math.isfinite(record["kd"])


def test_resumed_opd_run_ends_identical(tmp_path, monkeypatch):
    recipe = _arithmetic_opd(tmp_path, scale=1.25, reward="builtin", group_size=2)
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)


def test_bad_rewards_are_refused_before_training(write_recipe, run_cli, tmp_path):
    (tmp_path / "my_rewards.py").write_text("def wrong_shape(prompts, completions):\n    return [1.0]\n")
    cases = [({"reward": "no_such_module:f"}, "cannot import"), ({"reward": "my_rewards:wrong_shape"}, "returned"),
             ({"group_size": 3}, "group_size")]
    for index, (regime, message) in enumerate(cases):
        done = run_cli("run", write_recipe(_arithmetic_opd(tmp_path, **regime), f"r{index}.yaml"), cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "regime" in done.stderr
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_installed_command_imports_a_reward_from_the_current_directory(write_recipe, run_cli, tmp_path):
    """The `distill` console script (a process of its own, whose sys.path starts at its bin directory, not at
    the current directory as `python -m distill` does) still finds `module:function` rewards next to the
    user, and a refused recipe exits 2 without a traceback."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "my_rewards.py").write_text("def wrong_shape(prompts, completions):\n    return [1.0]\n")
    recipe = write_recipe(_arithmetic_opd(tmp_path, reward="my_rewards:wrong_shape"))
    command = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
    done = subprocess.run([command, "run", str(recipe)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "returned" in done.stderr and "Traceback" not in done.stderr  # imported, then refused for its shape
