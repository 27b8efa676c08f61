"""Hugging Face datasets as data.train / data.eval: save_to_disk directories (Dataset and DatasetDict),
splits, other data files, column mappings, and the errors for each kind of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import distill
from distill.core.errors import DistillError
from distill.lm.records import read_records


def _rows(count: int, offset: int = 0) -> list[dict]:
    return [{"instruction": f"a{(i + offset) % 3} b{(i + offset) % 5}", "response": f" c{(i + offset) % 4} d{i % 2}",
             "source": "made here"} for i in range(count)]


@pytest.fixture
def dataset_dict(tmp_path) -> Path:
    """A DatasetDict with train / test splits and instruction/response columns, written by save_to_disk."""
    import datasets

    directory = tmp_path / "instructions"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(24)),
                          "test": datasets.Dataset.from_list(_rows(6, offset=100))}).save_to_disk(directory)
    return directory


FIELDS = {"prompt": "instruction", "completion": "response"}


def test_a_saved_dataset_dict_with_splits_and_mapped_columns_runs_end_to_end(tiny_recipe, dataset_dict, tmp_path,
                                                                             write_recipe, run_cli):
    recipe = {**tiny_recipe, "data": {"train": str(dataset_dict), "eval_split": "test", "fields": FIELDS},
              "train": {**tiny_recipe["train"], "baseline": False}}
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((Path(recipe["output"]) / "results.json").read_text())
    assert {"teacher", "distilled"} <= set(results["rows"])
    # the eval rows are the test split (6 rows), scored by generation against their completions
    rows = read_records(str(dataset_dict), "data.train", "test", FIELDS)
    assert len(rows) == 6 and rows[0]["prompt"] == "a1 b0" and "instruction" not in rows[0]
    assert rows[0]["source"] == "made here"  # unmapped columns stay


def test_a_single_saved_dataset_and_a_csv_file(tmp_path):
    import datasets

    datasets.Dataset.from_list(_rows(5)).save_to_disk(tmp_path / "single")
    assert len(read_records(str(tmp_path / "single"), "data.train", "train", FIELDS)) == 5
    (tmp_path / "rows.csv").write_text("instruction,response\nx1,y1\nx2,y2\n")
    assert read_records(str(tmp_path / "rows.csv"), "data.train", None, FIELDS) == [
        {"prompt": "x1", "completion": "y1"}, {"prompt": "x2", "completion": "y2"}]


def test_a_data_directory_loads_through_load_dataset(tmp_path):
    data = tmp_path / "data_dir"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    assert [r["completion"] for r in read_records(str(data), "data.train", "train", FIELDS)] == [
        r["response"] for r in _rows(4)]


def test_mapping_to_chat_messages(tmp_path):
    import datasets

    rows = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "chat")
    assert read_records(str(tmp_path / "chat"), "data.train", "train", {"messages": "conversations"}) == [
        {"messages": rows[0]["conversations"]}]


@pytest.mark.parametrize("data, field, words", [
    ({"split": "validation"}, "data.split", ["validation", "train, test"]),
    ({"eval_split": "dev"}, "data.eval_split", ["dev", "train, test"]),
    ({"fields": {"prompt": "question", "completion": "response"}}, "data.fields",
     ["question", "instruction, response, source"]),
])
def test_bad_dataset_input_names_the_field_before_any_model_loads(tiny_recipe, dataset_dict, data, field, words):
    recipe = {**tiny_recipe, "data": {"train": str(dataset_dict), "fields": FIELDS, **data}}
    with pytest.raises(DistillError) as caught:
        distill.run(recipe)
    message = str(caught.value)
    assert field in message and all(word in message for word in words), message
    assert not Path(tiny_recipe["output"]).exists()


def test_a_directory_that_is_not_a_dataset_and_unknown_field_names(tiny_recipe, tmp_path):
    empty = tmp_path / "not_a_dataset"
    empty.mkdir()
    (empty / "notes.md").write_text("hello")
    with pytest.raises(DistillError, match=r"data\.train"):
        distill.run({**tiny_recipe, "data": {"train": str(empty)}})
    with pytest.raises(DistillError, match=r"data\.fields"):
        distill.run({**tiny_recipe, "data": {"train": str(empty), "fields": {"question": "q"}}})
    assert not Path(tiny_recipe["output"]).exists()


def test_rouge_l_hand_values():
    """LCS-based F1: 'the cat sat' vs 'the cat sat down': LCS 3, P = 3/3, R = 3/4, F1 = 6/7."""
    from distill.lm.evaluate import exact_match, rouge_l

    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)
    assert rouge_l(["sat the cat"], ["the cat sat"]) == pytest.approx(2 / 3)  # LCS "the cat"
    assert rouge_l(["", "a b"], ["x", "a b"]) == pytest.approx(0.5)
    assert exact_match([" a b ", "c"], ["a b", "d"]) == 0.5


def test_rouge_l_by_generation_in_every_row(tiny_recipe, dataset_dict):
    """Prompt/completion eval data: each row (teacher, alone, distilled) gets ROUGE-L of its greedy
    completions beside exact match, in results.json and the report's table."""
    recipe = {**tiny_recipe, "data": {"train": str(dataset_dict), "eval_split": "test", "fields": FIELDS},
              "eval": {**tiny_recipe["eval"], "generate_size": 6}}
    result = distill.run(recipe)
    for row in ("teacher", "alone", "distilled"):
        assert 0.0 <= result.rows[row]["rouge_l"] <= 1.0 and "exact_match" in result.rows[row]
    assert "ROUGE-L" in (result.run_dir / "report.md").read_text()
