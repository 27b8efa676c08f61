"""Experiment trackers (`log.trackers`, core.trackers): what a tensorboard run writes reads back equal to
losses.jsonl and metrics.jsonl; a missing package is refused before anything is written; wandb runs
offline unless the user configured it; wandb and trackio are driven through accelerate's classes as
their packages expect (checked against stand-in modules: neither package is a test dependency)."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import distill
from distill.core.errors import DistillError
from distill.core.recipe import load_recipe
from distill.core.trackers import (
    ExperimentTrackers,
    default_wandb_mode,
    flat_config,
    scalars,
)

torch.set_num_threads(1)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files of `directory` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} the trackers should hold, built from losses.jsonl and metrics.jsonl."""
    expected: dict[str, dict[int, float]] = {}
    for file, infix in (("losses.jsonl", ""), ("metrics.jsonl", "/eval")):
        for record in _jsonl(run_dir / file):
            for key, value in record.items():
                if key in ("phase", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                expected.setdefault(f"{record['phase']}{infix}/{key}", {})[record["step"]] = float(value)
    return expected


def _assert_tracker_equals_logs(run_dir: Path) -> None:
    logged = _tensorboard_scalars(run_dir / "trackers" / "tensorboard")
    expected = _expected(run_dir)
    assert set(logged) == set(expected)
    for tag, by_step in expected.items():
        assert logged[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():  # event files store float32
            assert logged[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True), (tag, step)


def test_tensorboard_scalars_read_back_equal_the_jsonl_logs(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe({**tiny_recipe, "name": "tb", "log": {"trackers": ["tensorboard"]}})
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    _assert_tracker_equals_logs(run_dir)
    expected = _expected(run_dir)
    # both rows trained, every logged step of each, the eval metrics with them
    assert {"alone/loss", "distilled/loss", "distilled/kd"} <= set(expected)
    assert expected["distilled/loss"].keys() == {1, 2, 3, 4}
    assert any(tag.startswith("distilled/eval/") for tag in expected)
    # the resolved recipe is the run's config (hparams.yml next to the event files: flat keys)
    hparams = list((run_dir / "trackers" / "tensorboard").glob("*/hparams.yml"))
    assert len(hparams) == 1
    config = yaml.safe_load(hparams[0].read_text())
    assert config["name"] == "tb" and config["train.steps"] == 4 and config["log.trackers"] == '["tensorboard"]'


FAMILY_RECIPES = {  # the tiny runs of tests/test_rundir.py: families without an Accelerator of their own
    "classifier": {"task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
                   "student": {"arch": "mlp", "options": {"hidden": [8]}},
                   "data": {"builtin": "digits", "eval_size": 100, "train_size": 200},
                   "train": {"epochs": 1, "log_every": 1}},
    "diffusion": {"task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
                  "student": {"method": "dmd", "eval_steps": [1]}, "data": {"builtin": "gmm2d"},
                  "train": {"steps": 4, "batch_size": 16, "log_every": 1, "checkpoint_every": 2},
                  "eval": {"samples": 100, "teacher_steps": [1], "every": 2, "curve_samples": 50}},
}


@pytest.mark.parametrize("task", sorted(FAMILY_RECIPES))
def test_every_family_logs_to_the_trackers(task, tmp_path):
    recipe = {**FAMILY_RECIPES[task], "output": str(tmp_path / "run"), "log": {"trackers": ["tensorboard"]}}
    distill.run(recipe)
    _assert_tracker_equals_logs(tmp_path / "run")
    assert any("/eval/" in tag for tag in _expected(tmp_path / "run"))


def test_a_resumed_run_keeps_logging_and_reads_back_equal_the_logs(tiny_recipe, tmp_path, monkeypatch):
    """The crashed run logged past its checkpoint; the resumed one logs those steps again in a second event
    file, and TensorBoard keeps the new values, as losses.jsonl (rewound) does."""
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 6, "baseline": False},
              "log": {"trackers": ["tensorboard"]}}
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "4")  # checkpoints every 2 steps: killed after step 4's
    with pytest.raises(SystemExit):
        distill.run(recipe)
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    run_dir = tmp_path / "run"
    assert _tensorboard_scalars(run_dir / "trackers" / "tensorboard")["distilled/loss"].keys() == {1, 2, 3, 4}
    distill.run(recipe, resume=True)
    assert len(list((run_dir / "trackers" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    _assert_tracker_equals_logs(run_dir)
    assert _expected(run_dir)["distilled/loss"].keys() == set(range(1, 7))


def test_a_missing_tracker_package_is_refused_before_anything_is_written(tiny_recipe, tmp_path, monkeypatch):
    for module in ("tensorboard", "tensorboardX"):  # None in sys.modules: `import tensorboard` fails
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DistillError) as error:
        distill.run({**tiny_recipe, "log": {"trackers": ["tensorboard"]}})
    assert error.value.field == "log.trackers"
    assert "pip install tensorboard" in error.value.fix
    assert not (tmp_path / "run").exists()


def test_log_section_is_validated_with_the_recipe(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    assert recipe.log.trackers == [] and recipe.log.project is None and recipe.log.dir is None
    for bad, words in (({"trackers": ["mlflow"]}, ["log.trackers"]), ({"trackers": ["wandb", "wandb"]},
                       ["log.trackers", "more than once"]), ({"projekt": "x"}, ["log.projekt", "project"])):
        with pytest.raises(DistillError) as error:
            load_recipe({**tiny_recipe, "log": bad})
        assert all(word in str(error.value) for word in words), (bad, str(error.value))


def test_wandb_runs_offline_unless_the_user_configured_it():
    unset: dict[str, str] = {}
    assert default_wandb_mode(unset) == "offline" and unset["WANDB_MODE"] == "offline"
    chosen = {"WANDB_MODE": "online"}
    assert default_wandb_mode(chosen) == "online" and chosen == {"WANDB_MODE": "online"}
    disabled = {"WANDB_MODE": "disabled"}
    assert default_wandb_mode(disabled) == "disabled" and disabled == {"WANDB_MODE": "disabled"}
    logged_in = {"WANDB_API_KEY": "k"}
    assert default_wandb_mode(logged_in) == "online" and "WANDB_MODE" not in logged_in


def test_records_become_numeric_scalars_named_by_phase():
    record = {"phase": "distilled", "step": 10, "loss": 0.5, "kd": 1, "fused_loss": True, "note": "x",
              "lr": None, "timing": {"teacher": 0.25}}
    assert scalars(record) == {"distilled/loss": 0.5, "distilled/kd": 1.0, "distilled/timing/teacher": 0.25}
    assert scalars({"phase": "alone", "step": 2, "accuracy": 0.75}, evaluation=True) == {"alone/eval/accuracy": 0.75}
    assert flat_config({"a": {"b": 1, "c": None}, "d": [1, {"e": 2}], "f": "g"}) == {
        "a.b": 1, "d": '[1, {"e": 2}]', "f": "g"}


class _FakeRun:
    """Records what a wandb / trackio run is asked to do."""

    def __init__(self, calls: list):
        self.calls = calls

    def define_metric(self, name, **options):
        self.calls.append(("define_metric", name, options))

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def finish(self, **options):
        self.calls.append(("finish", options))


def _fake_package(name: str, calls: list) -> types.ModuleType:
    module = types.ModuleType(name)
    module.config = types.SimpleNamespace(update=lambda values, **options: calls.append(("config", values)))

    def init(**options):
        calls.append(("init", options))
        return _FakeRun(calls)

    module.init = init
    return module


def test_wandb_through_accelerate_offline_with_a_step_axis_per_phase(tiny_recipe, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_package("wandb", calls))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    recipe = load_recipe({**tiny_recipe, "name": "w", "log": {"trackers": ["wandb"], "project": "p"}})
    trackers = ExperimentTrackers.open(recipe, tmp_path)
    assert calls[0] == ("init", {"project": "p", "name": "w", "dir": str(tmp_path / "trackers" / "wandb")})
    assert (tmp_path / "trackers" / "wandb").is_dir()
    assert os.environ["WANDB_MODE"] == "offline"
    assert calls[1] == ("config", recipe.model_dump(mode="json"))
    trackers.log({"phase": "alone", "step": 4, "loss": 1.5})
    trackers.log({"phase": "distilled", "step": 1, "loss": 2.0})  # a lower step than alone's: own axis
    trackers.log({"phase": "distilled", "step": 2, "accuracy": 0.5}, evaluation=True)
    trackers.close()
    trackers.close()  # idempotent
    assert calls[2:] == [
        ("define_metric", "alone/step", {}), ("define_metric", "alone/*", {"step_metric": "alone/step"}),
        ("log", {"alone/loss": 1.5, "alone/step": 4}, None),
        ("define_metric", "distilled/step", {}),
        ("define_metric", "distilled/*", {"step_metric": "distilled/step"}),
        ("log", {"distilled/loss": 2.0, "distilled/step": 1}, None),
        ("log", {"distilled/eval/accuracy": 0.5, "distilled/step": 2}, None),
        ("finish", {})]


def test_trackio_through_accelerate_gets_the_recipe_at_init(tiny_recipe, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "trackio", _fake_package("trackio", calls))
    recipe = load_recipe({**tiny_recipe, "name": "t", "log": {"trackers": ["trackio"]}})
    trackers = ExperimentTrackers.open(recipe, tmp_path)
    assert calls == [("init", {"project": "t", "name": "t", "config": recipe.model_dump(mode="json")})]
    trackers.log({"phase": "alone", "step": 3, "loss": 0.5, "fused_loss": False})
    trackers.close(failed=True)
    assert calls[1:] == [("log", {"alone/loss": 0.5}, 3), ("finish", {})]
