"""Teacher chains (TAKD): `assistants:` distills teacher -> assistant(s) -> student in one command."""
from __future__ import annotations

import json

import pytest
import yaml

import distill
from conftest import assert_same_student

from test_classifier import _recipe as classifier_recipe

ASSISTANT = {"config": {"hidden_size": 24, "num_attention_heads": 4, "intermediate_size": 48}}


def test_lm_chain_keeps_every_stage_and_resumes_to_the_same_students(tiny_recipe, tmp_path, monkeypatch):
    recipe = {**tiny_recipe, "assistants": [ASSISTANT], "name": "chain"}
    straight = distill.run({**recipe, "output": str(tmp_path / "straight")})
    assert list(straight.rows) == ["teacher", "assistant 1", "alone", "distilled"]
    stage = tmp_path / "straight" / "stages" / "1-assistant"
    stage_rows = json.loads((stage / "results.json").read_text())["rows"]
    assert "alone" not in stage_rows  # an assistant is trained with distillation only
    assert straight.rows["assistant 1"] == stage_rows["distilled"]
    assert json.loads((stage / "student" / "config.json").read_text())["hidden_size"] == 24
    stage_recipe = yaml.safe_load((stage / "recipe.yaml").read_text())
    assert stage_recipe["teacher"]["path"] == tiny_recipe["teacher"]["path"]
    saved = yaml.safe_load((tmp_path / "straight" / "recipe.yaml").read_text())
    assert saved["assistants"] and saved["teacher"]["path"] == tiny_recipe["teacher"]["path"]
    assert straight.meta["chain"][0]["run"] == str(stage)
    assert "assistant 1" in (tmp_path / "straight" / "report.md").read_text()
    # the final student learned from the assistant: its teacher row is not the top teacher's
    assert straight.rows["assistant 1"]["parameters"] < straight.rows["teacher"]["parameters"]

    # killed in the first stage, resumed: the same assistant and the same student, bit for bit
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "2")
    with pytest.raises(SystemExit):
        distill.run({**recipe, "output": str(tmp_path / "resumed")})
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    with pytest.raises(distill.DistillError, match="unfinished run"):
        distill.run({**recipe, "output": str(tmp_path / "resumed")})
    resumed = distill.run({**recipe, "output": str(tmp_path / "resumed")}, resume=True)
    assert_same_student(stage, tmp_path / "resumed" / "stages" / "1-assistant")
    assert_same_student(tmp_path / "straight", tmp_path / "resumed")
    assert resumed.rows["distilled"]["oracle_forward_kl"] == straight.rows["distilled"]["oracle_forward_kl"]


def test_classifier_chain_through_the_cli(tmp_path, write_recipe, run_cli):
    recipe = classifier_recipe(tmp_path, assistants=[{"arch": "mlp", "options": {"hidden": [32]}}])
    result = run_cli("run", write_recipe(recipe))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher", "assistant 1", "alone", "distilled"]
    assert "assistant 1" in result.stdout
    assert (tmp_path / "run" / "stages" / "1-assistant" / "student").is_dir()


def test_chains_that_cannot_work_are_refused_by_field(tmp_path, tiny_recipe, write_recipe, run_cli):
    bad = classifier_recipe(tmp_path, assistants=[{"arch": "mlp"}], regime={"kind": "self"}, teacher=None)
    result = run_cli("run", write_recipe(bad))
    assert result.returncode == 2 and "assistants" in result.stderr
    lm = {**tiny_recipe, "assistants": [{**ASSISTANT, "lora": {"r": 4}}]}
    result = run_cli("run", write_recipe(lm, "lm.yaml"))
    assert result.returncode == 2 and "assistants.0.lora" in result.stderr
    assert not (tmp_path / "run").exists()
