"""The run-directory contract, the same in every family: the same files, results.json with the same
top-level schema, the logs appended (a resumed run adds to them, never deletes), the refusals before
anything is written."""
from __future__ import annotations

import json

import pytest
import yaml

import distill
from distill.core.errors import DistillError

COMMON_FILES = ("recipe.yaml", "metrics.jsonl", "losses.jsonl", "results.json", "report.md", "report.html",
                "plots/loss.png", "plots/eval_metric.png", "student", "checkpoints")
META_KEYS = {"primary_metric", "higher_is_better", "seconds", "world_size", "task", "name", "recipe", "best_eval"}


def _recipes(tiny_recipe, tmp_path) -> dict[str, dict]:
    return {
        "lm": {**tiny_recipe, "output": str(tmp_path / "lm")},
        "classifier": {"task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
                       "student": {"arch": "mlp", "options": {"hidden": [8]}},
                       "data": {"builtin": "digits", "eval_size": 100, "train_size": 200},
                       "train": {"epochs": 1, "log_every": 1}, "output": str(tmp_path / "classifier")},
        "diffusion": {"task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
                      "student": {"method": "dmd", "eval_steps": [1]}, "data": {"builtin": "gmm2d"},
                      "train": {"steps": 4, "batch_size": 16, "log_every": 1, "checkpoint_every": 2},
                      "eval": {"samples": 100, "teacher_steps": [1], "every": 2, "curve_samples": 50},
                      "output": str(tmp_path / "diffusion")},
    }


def test_every_family_writes_the_same_run_directory(tiny_recipe, tmp_path):
    for task, recipe in _recipes(tiny_recipe, tmp_path).items():
        result = distill.run(recipe)
        run = result.run_dir
        for name in COMMON_FILES:
            assert (run / name).exists(), (task, name)
        assert any((run / "checkpoints").glob("*/state.json")), task
        saved = json.loads((run / "results.json").read_text())
        assert set(saved) == {"rows", "meta"}, task
        assert META_KEYS <= saved["meta"].keys(), (task, META_KEYS - saved["meta"].keys())
        assert saved["meta"]["task"] == task and saved["rows"] == result.rows
        assert saved["meta"]["primary_metric"] in next(iter(saved["rows"].values()))
        assert yaml.safe_load((run / "recipe.yaml").read_text())["task"] == task  # YAML, resolved
        for log in ("metrics.jsonl", "losses.jsonl"):
            records = [json.loads(line) for line in (run / log).read_text().splitlines()]
            assert records and all({"phase", "step"} <= r.keys() for r in records), (task, log)
        assert distill.RunResult.load(run).rows == result.rows


def test_refusals_come_before_any_write(tiny_recipe, tmp_path):
    recipe = _recipes(tiny_recipe, tmp_path)["classifier"]
    distill.run(recipe)
    before = sorted(p.name for p in (tmp_path / "classifier").iterdir())
    with pytest.raises(DistillError, match="finished run"):
        distill.run(recipe)
    with pytest.raises(DistillError, match="train.lr"):  # invalid: refused before the directory is looked at
        distill.run({**recipe, "train": {"lr": -1}}, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == before
    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="not a distill run"):
        distill.run({**recipe, "output": str(stranger)}, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_a_run_killed_while_writing_its_recipe_starts_afresh(tiny_recipe, tmp_path):
    """Found by the kill -9 soak: a kill between the staging and the rename of recipe.yaml left a directory
    holding only recipe.yaml.tmp, which --resume called "no run to resume" and a plain run "not empty"; and a kill
    right after the directory was made left it empty, where the first fix failed (and its error.log then made
    the directory "not empty")."""
    recipe = _recipes(tiny_recipe, tmp_path)["classifier"]
    output = tmp_path / "classifier"
    for resume, leftovers in ((True, ["recipe.yaml.tmp"]), (False, ["recipe.yaml.tmp", "error.log"]),
                              (True, []), (True, ["error.log"])):  # (the long soak found the empty directory)
        output.mkdir(exist_ok=True)
        for name in leftovers:
            (output / name).write_text("task: classi")  # cut short
        result = distill.run(recipe, resume=resume)
        assert (output / "results.json").is_file() and not (output / "recipe.yaml.tmp").exists()
        assert result.rows
        import shutil

        shutil.rmtree(output)
