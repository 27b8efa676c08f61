"""On-policy self-distillation with privileged context (regime self, OPSD): the teacher is the
student's own model shown privileged context before the prompt."""
from __future__ import annotations

import json

import pytest

import distill
from conftest import assert_same_student, run_interrupted_and_resumed


def _rows(path, count, field="solution"):
    rows = [{"prompt": " ".join(f"w{(i + j) % 64}" for j in range(3)),
             "completion": " ".join(f"w{(i * 7 + j) % 64}" for j in range(2 + i % 4)),
             field: " ".join(f"w{(i * 5 + j) % 64}" for j in range(4))} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _self_recipe(tiny_recipe, tmp_path, **regime):
    data = {"train": _rows(tmp_path / "train.jsonl", 24), "eval": _rows(tmp_path / "eval.jsonl", 8)}
    return {**tiny_recipe, "data": data,
            "regime": {"kind": "self", "privileged_field": "solution", "max_new_tokens": 5, **regime},
            "train": {**tiny_recipe["train"], "baseline": False}}


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def test_without_privileged_context_the_snapshot_teacher_is_the_student(tiny_recipe, tmp_path):
    """Template `{prompt}` hides the context: at step 1 teacher and student are one model on one
    input, so the divergence over the aligned completion tokens is exactly zero."""
    result = distill.run(_self_recipe(tiny_recipe, tmp_path, privileged_template="{prompt}"))
    first = _losses(result.run_dir)[0]
    assert first["sampled_batches"] == 1  # lmbda defaults to 1 for self
    assert first["kd"] == pytest.approx(0.0, abs=1e-6)


def test_self_distillation_with_privileged_context_runs_through_the_cli(tiny_recipe, write_recipe, run_cli, tmp_path):
    for weights in ("snapshot", "current"):
        recipe = _self_recipe(tiny_recipe, tmp_path, teacher_weights=weights)
        recipe["output"] = str(tmp_path / weights)
        done = run_cli("run", write_recipe(recipe, f"{weights}.yaml"))
        assert done.returncode == 0, done.stderr[-3000:]
        records = _losses(tmp_path / weights)
        assert len(records) == 4 and all(r["kd"] > 0 and r["generated_tokens"] > 0 for r in records)


def test_missing_privileged_field_is_refused_before_training(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = _self_recipe(tiny_recipe, tmp_path, privileged_field="hint")
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 2 and "regime.privileged_field" in done.stderr and "`hint`" in done.stderr
    assert not (tmp_path / "run").exists()


def test_resumed_self_distillation_ends_identical(tiny_recipe, tmp_path, monkeypatch):
    recipe = _self_recipe(tiny_recipe, tmp_path, lmbda=0.5)
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)
