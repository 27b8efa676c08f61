"""Differentially private students (train.privacy): DP-SGD through opacus, for classifiers and causal LMs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distill.core.privacy import PrivateTraining
from distill.core.recipe import PrivacySpec

from test_classifier import _recipe as classifier_recipe


def test_each_rows_gradient_is_clipped_then_averaged_by_hand():
    weight = torch.nn.Parameter(torch.zeros(2))
    private = PrivateTraining(PrivacySpec(max_grad_norm=1.0, noise_multiplier=0.0),
                              torch.optim.SGD([weight], lr=1.0), num_examples=10, batch_size=2, steps=5, seed=0)
    # row 1: norm 5, clipped to 1 -> [0.6, 0.8]; row 2: norm 0.5, kept; the sum over the expected batch (2)
    private.store([{weight: torch.tensor([3.0, 4.0])}, {weight: torch.tensor([0.3, 0.4])}])
    private.step(0)
    assert weight.detach().tolist() == pytest.approx([-(0.6 + 0.3) / 2, -(0.8 + 0.4) / 2], abs=1e-5)
    assert private.last_clipped == 0.5
    # with noise, the update moves by ~ noise_multiplier * max_grad_norm / batch per coordinate
    noisy = torch.nn.Parameter(torch.zeros(1000))
    private = PrivateTraining(PrivacySpec(max_grad_norm=1.0, noise_multiplier=2.0),
                              torch.optim.SGD([noisy], lr=1.0), num_examples=100, batch_size=4, steps=5, seed=0)
    private.store([])  # an empty Poisson batch: noise only
    private.step(0)
    assert float(noisy.detach().std()) == pytest.approx(2.0 / 4, rel=0.1)


def test_epsilon_is_accounted_grows_with_steps_and_meets_the_budget():
    def spent_after(steps: int, epsilon: float = 3.0) -> tuple[float, float]:
        weight = torch.nn.Parameter(torch.zeros(1))
        private = PrivateTraining(PrivacySpec(epsilon=epsilon), torch.optim.SGD([weight], lr=0.1),
                                  num_examples=1000, batch_size=32, steps=200, seed=0)
        for step in range(steps):
            private.store([{weight: torch.ones(1)}])
            private.step(step)
        return private.epsilon(), private.noise_multiplier

    early, sigma = spent_after(50)
    late, _ = spent_after(200)
    assert 0 < early < late <= 3.0 and late > 2.7  # the noise is the least that keeps 200 steps within epsilon 3
    assert sigma > 0.5
    sampler = PrivateTraining(PrivacySpec(noise_multiplier=1.0),
                              torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                              num_examples=1000, batch_size=32, steps=10, seed=0)
    batches = [sampler.batch(step) for step in range(200)]
    assert sum(map(len, batches)) / 200 == pytest.approx(32, rel=0.1)  # Poisson: rows at rate 32 / 1000


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def test_private_classifier_reports_epsilon_resumes_and_differs_from_a_public_run(tmp_path, write_recipe, run_cli,
                                                                                  monkeypatch):
    from safetensors.torch import load_file

    train = {"epochs": 3, "batch_size": 32, "lr": 0.01, "log_every": 2, "checkpoint_every": 10}
    private = classifier_recipe(tmp_path, train={**train, "privacy": {"epsilon": 2.0, "max_grad_norm": 0.5}})
    result = run_cli("run", write_recipe(private))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert 1.8 < rows["distilled"]["epsilon"] <= 2.0 and 1.8 < rows["alone"]["epsilon"] <= 2.0
    assert "differentially private" in result.stdout and "epsilon" in (tmp_path / "run" / "report.md").read_text()
    records = [r for r in _losses(tmp_path / "run") if r["phase"] == "distilled"]
    epsilons = [r["epsilon"] for r in records]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]  # spent grows with every step
    assert all(r["clipped"] > 0 for r in records)  # per-row clipping is active at max_grad_norm 0.5
    assert len({r["rows"] for r in records}) > 1  # Poisson batches vary in size

    public = classifier_recipe(tmp_path, train=train, output=str(tmp_path / "public"))
    assert run_cli("run", write_recipe(public, "public.yaml")).returncode == 0
    private_weights = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    public_weights = load_file(str(tmp_path / "public" / "student" / "model.safetensors"))
    assert not all(torch.equal(private_weights[k], public_weights[k]) for k in private_weights)

    # killed after a checkpoint and resumed: the same noise, batches and accountant -> the same student
    resumed = {**private, "output": str(tmp_path / "resumed")}
    path = write_recipe(resumed, "resumed.yaml")
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "10")
    assert run_cli("run", path).returncode != 0
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    assert run_cli("run", path, "--resume").returncode == 0
    first = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    second = load_file(str(tmp_path / "resumed" / "student" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["rows"]["distilled"]["epsilon"] == \
        rows["distilled"]["epsilon"]


def test_dp_opd_trains_only_the_student_privately(tiny_recipe, tmp_path):
    import distill

    recipe = {**tiny_recipe, "regime": {"kind": "opd", "scale": 1.0},
              "train": {**tiny_recipe["train"], "batch_size": 2, "privacy": {"noise_multiplier": 1.0}},
              "data": {**tiny_recipe["data"], "train_size": 64}}
    result = distill.run(recipe)
    assert math.isfinite(result.rows["distilled"]["epsilon"]) and result.rows["distilled"]["epsilon"] > 0
    assert result.meta["privacy"]["distilled"]["noise_multiplier"] == 1.0
    assert any("differentially private" in note for note in result.meta["notes"])


@pytest.mark.parametrize("edit, field", [
    ({"student": {"arch": "cnn", "options": {"channels": [4], "hidden": 8}}}, "train.privacy"),
    ({"regime": {"kind": "self"}, "teacher": None}, "train.privacy"),
])
def test_classifier_privacy_refusals(tmp_path, write_recipe, run_cli, edit, field):
    recipe = classifier_recipe(tmp_path, train={"epochs": 1, "privacy": {"epsilon": 1}}, **edit)
    result = run_cli("run", write_recipe(recipe))
    assert result.returncode == 2 and field in result.stderr
    assert not (tmp_path / "run").exists()


def test_lm_privacy_refusals(tiny_recipe, write_recipe, run_cli, tmp_path):
    both = {**tiny_recipe, "train": {**tiny_recipe["train"], "privacy": {"epsilon": 1, "noise_multiplier": 1}}}
    result = run_cli("run", write_recipe(both))
    assert result.returncode == 2 and "train.privacy" in result.stderr and "exactly one" in result.stderr
    batch = {**tiny_recipe, "regime": {"kind": "opd", "opd": {"baseline": "batch"}},
             "train": {**tiny_recipe["train"], "privacy": {"epsilon": 1}}}
    result = run_cli("run", write_recipe(batch, "b.yaml"))
    assert result.returncode == 2 and "regime.opd.baseline" in result.stderr
    assert not (tmp_path / "run").exists()
