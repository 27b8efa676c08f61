"""`distill select` (teacher-guided data selection) and `data.weights` (rows drawn by weight)."""
from __future__ import annotations

import json

import datasets
import pytest

from distill.lm.data import BatchOrder
from distill.lm.select import weights_from_scores
from distill.lm.tasks.oracle import SEQUENCE_LENGTH, HiddenMarkovOracle, OracleTask


def mixed_corpus(path, count: int = 48, seed: int = 0) -> list[str]:
    """Half the rows from the oracle language, half from another random HMM over the same symbols (a
    corrupted source); each row's `source` says which. Written as jsonl; returns the sources."""
    real = OracleTask().records(count // 2, seed, "train")
    other = HiddenMarkovOracle(seed=123).sample(count - count // 2, SEQUENCE_LENGTH, seed=[seed, 7])
    fake = [{"text": " ".join(f"w{s}" for s in row)} for row in other]
    rows = [{**r, "source": "oracle"} for r in real] + [{**r, "source": "corrupt"} for r in fake]
    rows = [rows[i] for i in sorted(range(count), key=lambda i: (i * 7919) % count)]  # interleaved
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [row["source"] for row in rows]


def test_weighted_order_draws_by_weight_and_is_a_function_of_position():
    order = BatchOrder(4, seed=3, weights=[0.0, 1.0, 3.0, 0.0])
    drawn = order.take(0, 4000)
    assert set(drawn) == {1, 2}  # weight 0: never
    assert drawn.count(2) / drawn.count(1) == pytest.approx(3.0, rel=0.1)
    assert order.take(1000, 50) == drawn[1000:1050]  # resuming at a position gives the same draws


def test_keep_and_temperature_weights_by_hand():
    assert weights_from_scores([0.1, 0.9, 0.5, float("nan")], keep=0.5, temperature=None) == [0, 1, 1, 0]
    soft = weights_from_scores([0.0, 1.0], keep=None, temperature=1.0)
    e = 2.718281828459045
    assert soft == pytest.approx([2 / (1 + e), 2 * e / (1 + e)])  # n * softmax(score / T), mean 1


def test_difference_selection_keeps_the_oracle_rows_and_trains_with_weights(tmp_path, write_recipe, run_cli,
                                                                            tiny_lm_dir):
    corpus = tmp_path / "mixed.jsonl"
    sources = mixed_corpus(corpus)
    recipe = {"teacher": {"path": "builtin:oracle-teacher"},
              "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 32}},
              "data": {"builtin": "oracle", "train": str(corpus), "eval_size": 8},
              "train": {"steps": 4, "batch_size": 4, "threads": 1, "log_every": 1},
              "eval": {"every": 4, "batch_size": 8, "generate_size": 4, "throughput_tokens": 4},
              "output": str(tmp_path / "run")}
    path = write_recipe(recipe)
    out = tmp_path / "selected"
    # reference: an untrained model of the same tokenizer (the oracle teacher's), so the score is the teacher's
    # log-likelihood up to a near-constant: the teacher prefers its own language
    result = run_cli("select", path, "--reference", str(tiny_lm_dir), "--out", out, "--keep", "0.5")
    assert result.returncode == 0, result.stderr
    assert "kept the top 50%: 24 of 48 rows" in result.stdout
    kept = datasets.load_from_disk(str(out))
    assert len(kept) == 24 and {"text", "source", "score", "weight"} <= set(kept.column_names)
    precision = sum(source == "oracle" for source in kept["source"]) / len(kept)
    assert precision >= 0.9, precision
    manifest = json.loads((out / "selection.json").read_text())
    assert manifest["method"] == "difference" and manifest["rows"] == 48
    again = run_cli("select", path, "--reference", str(tiny_lm_dir), "--out", out)
    assert again.returncode == 2 and "--out" in again.stderr  # a selection is never silently replaced

    weighted = tmp_path / "weighted"
    assert run_cli("select", path, "--reference", str(tiny_lm_dir), "--out", weighted, "--temperature", "0.5",
                   "--method", "divergence").returncode == 0
    rows = datasets.load_from_disk(str(weighted))
    assert len(rows) == 48 and sum(rows["weight"]) == pytest.approx(48)
    assert sources == rows["source"]  # every row, in order

    # train on the weighted rows, scored on the oracle task's own evaluation
    run = run_cli("run", write_recipe({**recipe, "data": {**recipe["data"], "train": str(weighted),
                                                          "weights": "weight"}}, "weighted.yaml"))
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert "oracle_forward_kl" in rows["distilled"]


def test_bad_weights_are_refused_with_the_row(tmp_path, write_recipe, run_cli, tiny_recipe):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"text": "w1 w2", "w": 1}\n{"text": "w3 w4", "w": -2}\n' * 8)
    recipe = {**tiny_recipe, "data": {"train": str(corpus), "weights": "w", "eval_size": 4}}
    result = run_cli("run", write_recipe(recipe))
    assert result.returncode == 2 and "data.weights" in result.stderr and "row 2" in result.stderr
    assert not (tmp_path / "run").exists()
    builtin = {**tiny_recipe, "data": {"builtin": "oracle", "weights": "w"}}
    result = run_cli("run", write_recipe(builtin, "b.yaml"))
    assert result.returncode == 2 and "data.weights" in result.stderr
