"""Recipes: every malformed recipe is a DistillError naming the field (API and CLI), `--set`
overrides, and round trips through YAML."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from distill.core.errors import DistillError
from distill.core.recipe import apply_override, load_recipe, parse_recipe
from distill.lm.recipe import LMRecipe as Recipe

torch.set_num_threads(1)

# A valid recipe that needs no files: validation never opens the teacher.
BASE = {
    "teacher": {"path": "teachers/tiny"},
    "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}},
    "data": {"builtin": "oracle", "train_size": 32, "eval_size": 8},
    "train": {"steps": 4, "batch_size": 4},
}


def _edit(path: str, value) -> dict:
    """BASE with `path` (dotted) set to `value`; value None-sentinel `DELETE` removes the key."""
    recipe = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = recipe
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return recipe


DELETE = object()

# (id, recipe dict | raw YAML text, --set overrides, substrings the error must contain)
MALFORMED = [
    ("yaml-unclosed-bracket", "name: x\nteacher: {path: t}\ntrain: {steps: 4, lr: 0.1\ndata: {builtin: oracle}\n",
     [], ["not valid YAML", "line 4", "line 3"]),
    ("top-level-list", "- teacher\n- student\n", [], ["mapping", "list"]),
    ("unknown-top-level-key", {**BASE, "trian": {"steps": 3}}, [], ["trian", "did you mean `train`"]),
    ("unknown-nested-key", _edit("train.lrr", 0.1), [], ["train.lrr", "did you mean `lr`", "unknown key"]),
    ("wrong-type", _edit("train.steps", "many"), [], ["train.steps", "'many'"]),
    ("negative-lr", _edit("train.lr", -0.1), [], ["train.lr", "greater than 0"]),
    ("zero-batch-size", _edit("train.batch_size", 0), [], ["train.batch_size"]),
    ("missing-teacher", _edit("teacher", DELETE), [], ["teacher", "missing"]),
    ("student-path-and-config", _edit("student.path", "students/s"), [], ["student", "exactly one"]),
    ("student-neither", _edit("student", {}), [], ["student", "exactly one"]),
    ("init-layers-without-config", _edit("student", {"path": "s", "init_from_teacher_layers": [0]}), [],
     ["student.init_from_teacher_layers"]),
    ("data-neither-builtin-nor-train", _edit("data.builtin", None), [], ["data", "data.builtin", "data.train"]),
    ("data-eval-without-train", _edit("data.eval", "eval.jsonl"), [], ["data.eval"]),
    ("unknown-builtin-task", _edit("data.builtin", "sudoku"), [], ["data.builtin", "'sudoku'"]),
    ("unknown-loss", _edit("objective", {"loss": "jsdd"}), [], ["objective.loss", "did you mean 'jsd'", "sinkhorn"]),
    ("param-out-of-range", _edit("objective", {"loss": "jsd", "beta": 1.5}), [],
     ["objective.beta", "[0, 1]", "got 1.5", "use beta=0.5"]),
    ("param-not-an-integer", _edit("objective", {"loss": "sinkhorn", "iterations": 2.5}), [],
     ["objective.iterations", "an integer in [1, inf)"]),
    ("schedule-without-its-loss", _edit("objective", {"loss": "jsd", "taid": {}}), [], ["objective.taid", "taid"]),
    ("param-not-of-loss", _edit("objective", {"loss": "forward_kl", "beta": 0.5}), [],
     ["objective.beta", "forward_kl"]),
    ("misspelt-param", _edit("objective", {"loss": "jsd", "betta": 0.5}), [], ["objective.betta", "beta"]),
    ("param-wrong-type", _edit("objective", {"loss": "jsd", "beta": "x"}), [], ["objective.beta", "number"]),
    ("temperature-zero", _edit("objective", {"temperature": 0}), [], ["objective.temperature"]),
    ("no-loss-weight", _edit("objective", {"kd_weight": 0, "ce_weight": 0}), [],
     ["objective", "kd_weight", "ce_weight"]),
    ("regime-unknown", _edit("regime", {"kind": "ppo"}), [], ["regime.kind", "on_policy"]),
    ("diffusion-lm-sections", {**BASE, "task": "diffusion"}, [], ["student.method", "data.builtin", "gmm2d"]),
    ("classifier-lm-sections", {**BASE, "task": "classifier"}, [], ["student.config", "unknown key", "data.builtin", "mnist5k"]),
    ("warmup-not-below-steps", _edit("train.warmup_steps", 4), [], ["train.warmup_steps", "below steps"]),
    ("too-long-literal", _edit("data.too_long", "cut"), [], ["data.too_long", "'cut'"]),
    ("set-without-equals", BASE, ["train.steps"], ["--set", "train.steps"]),
    ("set-into-scalar", BASE, ["train.steps.x=1"], ["--set", "train.steps", "not a section"]),
    ("set-invalid-value", BASE, ["train.lr=0"], ["train.lr"]),
]


def _source(payload, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(payload if isinstance(payload, str) else yaml.safe_dump(payload, sort_keys=False))
    return path


@pytest.mark.parametrize("payload, overrides, expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_names_the_field(payload, overrides, expected, tmp_path):
    with pytest.raises(DistillError) as raised:
        load_recipe(_source(payload, tmp_path), overrides)
    text = str(raised.value)
    for part in expected:
        assert part in text, f"{part!r} not in:\n{text}"
    assert raised.value.fix, "every recipe error says how to fix it"


def test_recipe_file_not_found(tmp_path):
    with pytest.raises(DistillError, match="not found") as raised:
        load_recipe(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(raised.value)


def test_unknown_builtin_recipe():
    with pytest.raises(DistillError, match="no built-in recipe `nope`") as raised:
        load_recipe("builtin:nope")
    assert "oracle-demo" in raised.value.fix


def test_parse_recipe_rejects_non_mapping():
    with pytest.raises(DistillError, match="mapping"):
        parse_recipe(["teacher"])


def test_empty_file_is_called_empty_and_lists_the_required_sections(tmp_path):
    with pytest.raises(DistillError) as raised:
        load_recipe(_source("", tmp_path))
    assert "is empty" in str(raised.value) and "required field is missing" not in str(raised.value)
    assert "sections teacher, student, data" in str(raised.value)


# ---- through the CLI --------------------------------------------------------------------------

CLI_CASES = {  # id -> (recipe edit, --set overrides, field the error must name)
    "negative-lr": (("train.lr", -1.0), [], "train.lr"),
    "unknown-builtin-task": (("data.builtin", "sudoku"), [], "data.builtin"),
    "param-not-of-loss-via-set": (None, ["objective.beta=0.5"], "objective.beta"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, run_cli):
    """Every CLI case, run once for the module."""
    directory = tmp_path_factory.mktemp("cli_recipes")

    def one(case_id):
        edit, overrides, _ = CLI_CASES[case_id]
        recipe = _edit(*edit) if edit else copy.deepcopy(BASE)
        path = directory / f"{case_id}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        sets = [arg for assignment in overrides for arg in ("--set", assignment)]
        return run_cli("run", str(path), *sets, cwd=directory)

    return {case_id: one(case_id) for case_id in CLI_CASES}  # in-process calls: one at a time


@pytest.mark.parametrize("case_id", list(CLI_CASES))
def test_cli_reports_recipe_errors_without_traceback(cli_results, case_id):
    result = cli_results[case_id]
    field = CLI_CASES[case_id][2]
    assert result.returncode == 2, result.stderr
    assert field in result.stderr
    assert "error" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr


# ---- --set overrides --------------------------------------------------------------------------

def test_set_values_are_parsed_as_yaml(tmp_path):
    recipe = load_recipe(_source(BASE, tmp_path), [
        "train.lr=1e-3", "train.baseline=false", "objective.loss=jsd", "objective.beta=0.3", "name=my run"])
    assert recipe.train.lr == pytest.approx(1e-3) and isinstance(recipe.train.lr, float)
    assert recipe.train.baseline is False
    assert recipe.objective.loss == "jsd"
    assert recipe.objective.loss_params() == {"beta": 0.3}
    assert recipe.name == "my run"


def test_set_creates_fields_absent_from_the_file(tmp_path):
    assert "objective" not in BASE and "eval" not in BASE
    recipe = load_recipe(_source(BASE, tmp_path), ["eval.every=7", "objective.temperature=2"])
    assert recipe.eval.every == 7
    assert recipe.objective.temperature == 2.0


def test_set_later_override_wins_and_caller_dict_is_untouched():
    original = copy.deepcopy(BASE)
    recipe = load_recipe(BASE, ["train.steps=10", "train.steps=20"])
    assert recipe.train.steps == 20
    assert BASE == original


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML alone reads `1e-1` as a string; loss parameters must still accept it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE) + "objective: {loss: jsd, beta: 1e-1}\n")
    assert load_recipe(path).objective.loss_params() == {"beta": pytest.approx(0.1)}
    assert load_recipe(path, ["objective.beta=2.5E-1"]).objective.loss_params() == {"beta": pytest.approx(0.25)}


def test_objective_reads_the_registry_aliases_defaults_and_coerced_values():
    recipe = parse_recipe({**copy.deepcopy(BASE), "objective": {"loss": "sinkd", "iterations": "5"}})
    assert recipe.objective.loss == "sinkhorn"  # the canonical name, as the resolved recipe.yaml records it
    assert recipe.objective.loss_params() == {"epsilon": 0.1, "iterations": 5}
    assert "iterations: 5\n" in recipe.to_yaml()


def test_apply_override_in_place():
    data = {"train": {"steps": 4}}
    apply_override(data, "train.schedule=linear")
    apply_override(data, "eval.every=3")
    apply_override(data, "student.config={hidden_size: 8}")
    assert data == {"train": {"steps": 4, "schedule": "linear"}, "eval": {"every": 3},
                    "student": {"config": {"hidden_size": 8}}}


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(_source(BASE, tmp_path), [
        "train.lr=1e-3", "objective.loss=jsd", "objective.beta=0.3", "name=1e3", "train.max_grad_norm=null"])
    again_path = tmp_path / "resolved.yaml"
    again_path.write_text(recipe.to_yaml())
    again = load_recipe(again_path)
    assert again == recipe
    assert again.name == "1e3" and again.train.max_grad_norm is None
    assert load_recipe(recipe) == recipe  # a Recipe is also a valid source


def test_builtin_oracle_demo_loads():
    recipe = load_recipe("builtin:oracle-demo")
    assert isinstance(recipe, Recipe)
    assert recipe.teacher.path == "builtin:oracle-teacher"
    assert recipe.data.builtin == "oracle"
    assert recipe.objective.loss == "forward_kl"
    assert recipe.train.warmup_steps < recipe.train.steps


def test_defaults_of_a_minimal_recipe(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    assert recipe.objective.loss == "forward_kl" and recipe.regime.kind == "off_policy"
    assert recipe.output_dir.name == "run"
    assert load_recipe({**tiny_recipe, "output": None, "name": "x"}).output_dir.as_posix() == "runs/x"


def test_taid_schedule_needs_the_taid_loss_and_a_fixed_t_replaces_it():
    from distill.core.recipe import parse_recipe

    recipe = parse_recipe({**copy.deepcopy(BASE), "objective": {"loss": "taid"}})
    assert recipe.objective.taid.t_start == 0.4  # the default schedule is filled in
    with pytest.raises(DistillError, match="objective.taid"):
        parse_recipe({**copy.deepcopy(BASE), "objective": {"loss": "jsd", "taid": {"t_start": 0.2}}})
    fixed = parse_recipe({**copy.deepcopy(BASE), "objective": {"loss": "taid", "t": 0.5}})
    assert fixed.objective.taid is None and fixed.objective.loss_params()["t"] == 0.5  # constant t, no schedule
    with pytest.raises(DistillError, match="objective.t"):
        parse_recipe({**copy.deepcopy(BASE), "objective": {"loss": "taid", "t": 0.5, "taid": {}}})
