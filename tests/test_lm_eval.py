"""`distill eval RUN --lm-eval TASKS`: a finished tiny LM run scored on local lm-eval YAML tasks (offline),
each row as lm-eval scores that model alone, and unknown task names refused before any model loads."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe_for

pytest.importorskip("lm_eval")

torch.set_num_threads(1)


def write_tasks(directory) -> None:
    """Two tasks over local jsonl files in the oracle tokenizer's words (w0..w63): a multiple-choice one
    (acc) and a rolling-loglikelihood one (perplexities, continuous: an exact check of the scores)."""
    directory.mkdir()
    choice = [{"question": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 3}", f"w{(i + 9) % 60}"], "label": i % 2}
              for i in range(6)]
    (directory / "choice.jsonl").write_text("".join(json.dumps(row) + "\n" for row in choice))
    text = [{"text": " ".join(f"w{(i * 7 + j) % 64}" for j in range(12))} for i in range(4)]
    (directory / "text.jsonl").write_text("".join(json.dumps(row) + "\n" for row in text))
    local = {"dataset_path": "json", "test_split": "test"}
    (directory / "tiny_choice.yaml").write_text(yaml.safe_dump({
        "task": "tiny_choice", **local, "dataset_kwargs": {"data_files": {"test": str(directory / "choice.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "label", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    (directory / "tiny_text.yaml").write_text(yaml.safe_dump({
        "task": "tiny_text", **local, "dataset_kwargs": {"data_files": {"test": str(directory / "text.jsonl")}},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}))


@pytest.fixture(scope="module")
def finished_run(tiny_lm_dir, tmp_path_factory):
    """A tiny finished LM run (2 steps per phase): teacher (tiny_lm_dir), alone/ and student/ saved."""
    import distill

    tmp_path = tmp_path_factory.mktemp("lm_eval")
    recipe = tiny_recipe_for(tiny_lm_dir, tmp_path)
    recipe["train"].update(steps=2, checkpoint_every=100)
    recipe["eval"].update(every=100, generate_size=2, throughput_tokens=2)
    return distill.run(recipe).run_dir


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub (datasets read the switches when imported, so they are set on its config), and a datasets
    cache of the test's own."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`distill ARGS` in this process (torch and transformers already loaded): (exit code, stdout, stderr)."""
    from distill.cli import main

    monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_scored_on_local_harness_tasks(finished_run, offline, monkeypatch, capsys, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path / "tasks")
    code, out, err = cli(monkeypatch, capsys, "eval", finished_run, "--lm-eval", "tiny_choice,tiny_text",
                         "--lm-eval-include", tmp_path / "tasks", "--output", tmp_path / "rows.json")
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "rows.json").read_text())
    rows, meta = result["rows"], result["meta"]
    assert list(rows) == ["teacher", "alone", "distilled"]
    for metrics in rows.values():
        assert set(metrics) == {"tiny_choice/acc", "tiny_text/word_perplexity", "tiny_text/bits_per_byte"}
        assert 0 <= metrics["tiny_choice/acc"] <= 1 and metrics["tiny_text/bits_per_byte"] > 0
    assert meta["primary_metric"] == "tiny_choice/acc" and meta["higher_is_better"] is True
    assert meta["directions"]["tiny_text/word_perplexity"] == "lower"
    assert meta["lm_eval"]["documents"] == {"tiny_choice": 6, "tiny_text": 4}
    assert "tiny_choice/acc" in out and "distilled" in out and "Running loglikelihood" not in err
    # Each row is what lm-eval itself computes for that model, loaded by path through its HF wrapper: the
    # teacher (first), and the distilled student (last: the tasks built once serve every model).
    teacher = yaml.safe_load((finished_run / "recipe.yaml").read_text())["teacher"]["path"]
    for row, model_dir in [("teacher", teacher), ("distilled", finished_run / "student")]:
        reference = lm_eval.simple_evaluate(
            model=HFLM(pretrained=str(model_dir), device="cpu", batch_size=8), tasks=["tiny_choice", "tiny_text"],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            log_samples=False, bootstrap_iters=0)["results"]
        assert rows[row]["tiny_choice/acc"] == reference["tiny_choice"]["acc,none"]
        assert rows[row]["tiny_text/bits_per_byte"] == pytest.approx(reference["tiny_text"]["bits_per_byte,none"],
                                                                     rel=1e-5)
    assert rows["distilled"]["tiny_text/bits_per_byte"] != rows["teacher"]["tiny_text/bits_per_byte"]


def test_metric_columns_name_task_metric_and_hide_subtasks_of_a_scored_group():
    from distill.lm.harness import metric_columns

    results = {"results": {"grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": 0.1},
                           "sub_a": {"alias": " - sub_a", "acc,none": 0.25, "acc_stderr,none": "N/A"},
                           "gen": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2,
                                   "sample_len": 10}},
               "group_subtasks": {"grp": ["sub_a"], "gen": []},
               "higher_is_better": {"grp": {"acc": True}, "sub_a": {"acc": True}, "gen": {"exact_match": True}}}
    row, directions, hidden = metric_columns(results)
    assert row == {"grp/acc": 0.5, "sub_a/acc": 0.25, "gen/exact_match:strict-match": 0.1,
                   "gen/exact_match:flexible-extract": 0.2}
    assert hidden == ["sub_a/acc"] and set(directions.values()) == {"higher"}


def test_one_saved_model_with_a_limit(finished_run, offline, monkeypatch, capsys, tmp_path):
    write_tasks(tmp_path / "tasks")
    code, _, err = cli(monkeypatch, capsys, "eval", finished_run / "student", "--lm-eval", "tiny_choice",
                       "--lm-eval-include", tmp_path / "tasks", "--lm-eval-limit", "3", "--output", tmp_path / "one.json")
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "one.json").read_text())
    assert list(result["rows"]) == ["model"] and list(result["rows"]["model"]) == ["tiny_choice/acc"]
    assert result["meta"]["lm_eval"]["documents"] == {"tiny_choice": 3}


def test_unknown_task_is_refused_before_any_model_loads(finished_run, offline, monkeypatch, capsys, tmp_path):
    from distill.lm import models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    write_tasks(tmp_path / "tasks")
    code, _, err = cli(monkeypatch, capsys, "eval", finished_run, "--lm-eval", "tiny_choise",
                       "--lm-eval-include", tmp_path / "tasks")
    assert code == 2, err[-3000:]
    assert "--lm-eval: unknown lm-eval task `tiny_choise` (close: tiny_choice" in err
    assert "--lm-eval-include DIR" in err
    # Options that belong to distill's own evaluation do not mix with --lm-eval.
    code, _, err = cli(monkeypatch, capsys, "eval", finished_run, "--lm-eval", "tiny_choice", "--data", "x.jsonl")
    assert code == 2 and "--lm-eval" in err


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    from distill.core.errors import DistillError
    from distill.lm.harness import import_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(DistillError, match=r'pip install "distill\[eval\]"') as error:
        import_lm_eval()
    assert error.value.field == "--lm-eval"
