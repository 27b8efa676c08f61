"""Preference distillation (regime preference): pairs read from files (text and chat, with file-and-line
errors) and from the arithmetic task, recipe checks naming the field, dpo / redi / dckd end to end through
the CLI, DPO's reference being the model asked for, and an exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import assert_same_student, run_interrupted_and_resumed
from distill.core.errors import DistillError
from distill.core.recipe import load_recipe
from distill.lm.data import IGNORE_INDEX
from distill.lm.preference import PreferenceExample, load_preference_data, pair_rows
from distill.lm.recipe import DataSpec
from distill.lm.tasks.arithmetic import NUM_DIGITS, ArithmeticTask

torch.set_num_threads(1)

TEXT_ROW = {"prompt": "1 2 + 3 4 =", "chosen": "4 6", "rejected": "4 7"}


def _arithmetic(tmp_path, objective: dict, **sections) -> dict:
    """A tiny arithmetic preference recipe (the shipped teacher, a 1-layer student)."""
    recipe = {"teacher": {"path": "builtin:arithmetic-teacher"},
              "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 64}},
              "data": {"builtin": "arithmetic", "train_size": 16, "eval_size": 4},
              "objective": objective, "regime": {"kind": "preference"},
              "train": {"steps": 4, "batch_size": 4, "threads": 1, "checkpoint_every": 2, "log_every": 1},
              "eval": {"every": 2, "batch_size": 4, "generate_size": 2, "throughput_tokens": 2},
              "output": str(tmp_path / "run")}
    for name, values in sections.items():  # merged into the section; a student replaces it
        recipe[name] = values if name == "student" else {**recipe.get(name, {}), **values}
    return recipe


def _losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


# ---- rows ---------------------------------------------------------------------------------------------

def test_pair_rows_of_every_shape():
    assert pair_rows({**TEXT_ROW, "id": "a"}) == ({"prompt": "1 2 + 3 4 =", "completion": "4 6", "id": "a"},
                                                  {"prompt": "1 2 + 3 4 =", "completion": "4 7", "id": "a"})
    user = [{"role": "user", "content": "hi"}]
    reply = {"role": "assistant", "content": "hello"}
    expected = ({"messages": user + [reply]}, {"messages": user + [{"role": "assistant", "content": "go away"}]})
    assert pair_rows({"messages": user, "chosen": "hello", "rejected": "go away"}) == expected  # text replies
    assert pair_rows({"prompt": user, "chosen": [reply], "rejected": {"role": "assistant", "content": "go away"}}
                     ) == expected  # TRL's conversational rows: one message each, or the message alone
    assert pair_rows({"chosen": user + [reply], "rejected": expected[1]["messages"]}) == expected  # implicit prompt


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "chosen": "a"}, "expects `chosen` + `rejected`"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "`chosen` is None, not text"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "as chat `messages`"),
    ({"messages": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}] * 2,
      "rejected": "b"}, "as one {role, content} message"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "every message but"),
    ({"messages": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"}, "`content` is 3"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "`prompt` is None"),
], ids=["no rejected", "null chosen", "messages with a text prompt", "two replies", "different prompts",
        "bad message", "null prompt"])
def test_a_bad_preference_row_is_refused_with_its_file_and_line(row, expected, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (TEXT_ROW, TEXT_ROW, row, TEXT_ROW)) + "\n")
    spec = DataSpec(train=str(path), eval_size=1)
    with pytest.raises(DistillError) as raised:
        load_preference_data(spec, ArithmeticTask().tokenizer(), None)
    assert raised.value.field == "data.train"
    assert f"`{path}` line 3" in raised.value.message and expected in raised.value.message, raised.value.message
    assert "chosen" in raised.value.fix


def test_plain_rows_name_the_preference_regime():
    from distill.lm.records import row_problem

    assert "regime.kind preference" in row_problem(TEXT_ROW)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_pairs_from_files_tokenize_chosen_and_rejected(suffix, tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "chosen": f"{i + 1}", "rejected": f"{i + 2}", "id": f"r{i}"} for i in range(6)]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    tokenizer = ArithmeticTask().tokenizer()
    train_records, eval_records, train, evaluation = load_preference_data(DataSpec(train=str(path), eval_size=2),
                                                                          tokenizer, None)
    assert [e.id for e in train] == ["r0", "r1", "r2", "r3"] and len(evaluation) == 2
    assert train_records[0] == {"prompt": "0 + 1 =", "completion": "1", "id": "r0"}
    assert eval_records[1] == {"prompt": "5 + 1 =", "completion": "6", "id": "r5"}  # scored on the chosen answer
    for example, row in zip(train, rows):
        assert isinstance(example, PreferenceExample)
        prompt = tokenizer(row["prompt"]).input_ids
        for side, text in ((example, row["chosen"]), (example.rejected, row["rejected"])):
            completion = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            assert side.input_ids == prompt + completion
            assert side.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_chat_pairs_share_the_prompt_tokens(tmp_path):
    user = [{"role": "user", "content": "1 + 1 ="}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": user, "chosen": "2", "rejected": "3"}) + "\n" + json.dumps(
        {"chosen": user + [{"role": "assistant", "content": "2"}],
         "rejected": user + [{"role": "assistant", "content": "4"}]}) + "\n")
    _, eval_records, train, _ = load_preference_data(DataSpec(train=str(path), eval=str(path)),
                                                     ArithmeticTask().tokenizer(), None)
    for chosen in train:
        rejected = chosen.rejected
        prompt_length = next(t for t, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
        assert chosen.input_ids[:prompt_length] == rejected.input_ids[:prompt_length] == train[0].input_ids[
            :prompt_length]
        assert chosen.input_ids != rejected.input_ids
    assert eval_records[0]["messages"][-1] == {"role": "assistant", "content": "2"}  # scored on the chosen reply


def test_eval_rows_may_be_plain_rows_and_their_errors_name_the_eval_file(tmp_path):
    pairs, plain = tmp_path / "pairs.jsonl", tmp_path / "eval.jsonl"
    pairs.write_text(json.dumps(TEXT_ROW) + "\n")
    plain.write_text(json.dumps({"prompt": "1 + 1 =", "completion": "2"}) + "\n" + json.dumps(TEXT_ROW) + "\n")
    tokenizer = ArithmeticTask().tokenizer()
    _, eval_records, _, evaluation = load_preference_data(DataSpec(train=str(pairs), eval=str(plain)), tokenizer,
                                                          None)
    assert [r["completion"] for r in eval_records] == ["2", "4 6"] and len(evaluation) == 2
    plain.write_text(json.dumps({"prompt": "1 + 1 =", "completion": "2"}) + "\n\n" + json.dumps({"prompt": "x"}))
    with pytest.raises(DistillError) as raised:
        load_preference_data(DataSpec(train=str(pairs), eval=str(plain)), tokenizer, None)
    assert raised.value.field == "data.eval" and f"`{plain}` line 3" in raised.value.message


# ---- the arithmetic pairs -----------------------------------------------------------------------------

def test_arithmetic_pairs_are_a_correct_and_a_plausible_wrong_answer():
    task = ArithmeticTask()
    pairs = task.preference_records(300, 7, "train")
    assert pairs == task.preference_records(300, 7, "train")  # deterministic from data.seed
    assert pairs != task.preference_records(300, 8, "train")
    assert [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs] == task.records(300, 7, "train")

    def value(written: str) -> int:
        return int("".join(written.split())[::-1])
    kinds = set()
    for pair in pairs:
        assert pair["rejected"] != pair["chosen"] and len(pair["rejected"].split()) == NUM_DIGITS + 1
        left, right = (value(part) for part in pair["prompt"].rstrip("= ").split("+"))
        assert value(pair["chosen"]) == left + right
        error = value(pair["rejected"]) - (left + right)
        no_carry = int("".join(str((int(a) + int(b)) % 10) for a, b in zip(f"{left:04d}", f"{right:04d}")))
        if value(pair["rejected"]) == no_carry:
            kinds.add("carry dropped")
        else:
            assert abs(error) in {10 ** k for k in range(NUM_DIGITS + 1)}, pair
            kinds.add("a digit off by one")
    assert kinds == {"carry dropped", "a digit off by one"}


# ---- recipes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, regime, other, field, expected", [
    ({"loss": "dpo"}, {"kind": "off_policy"}, {}, "objective.loss", "set regime.kind: preference"),
    ({"loss": "forward_kl"}, {"kind": "preference"}, {}, "objective.loss", "is a token loss"),
    ({"loss": "adpa"}, {"kind": "preference"}, {}, "regime.preference.teacher_reference", "needs the aligned"),
    ({"loss": "dpo", "beta": 0}, {"kind": "preference"}, {}, "objective.beta", "beta"),
    ({"loss": "redi", "beta": 0.1}, {"kind": "preference"}, {}, "objective.beta", "not a parameter of loss `redi`"),
    ({"loss": "dpo", "temperature": 2.0}, {"kind": "preference"}, {}, "objective.temperature", "temperature 1"),
    ({"loss": "redi"}, {"kind": "preference", "preference": {"reference": "teacher"}}, {},
     "regime.preference.reference", "has none"),
    ({"loss": "forward_kl"}, {"kind": "off_policy", "preference": {"reference": "teacher"}}, {},
     "regime.preference", "set kind: preference"),
    ({"loss": "dckd"}, {"kind": "preference"}, {"teacher": {"url": "http://127.0.0.1:9/v1", "path": "t"}},
     "teacher.url", "teacher.path"),
    ({"loss": "dpo"}, {"kind": "preference"}, {"data": {"builtin": "arithmetic", "packing": True}},
     "data.packing", "as a pair"),
    ({"loss": "redi"}, {"kind": "preference"}, {"data": {"builtin": "arithmetic", "completion_only": False}},
     "data.completion_only", "score the completions"),
], ids=["dpo off_policy", "token loss", "adpa", "bad beta", "unknown param", "temperature", "redi reference",
        "options of another kind", "dckd served", "packing", "prompt loss"])
def test_recipe_refuses_a_preference_mismatch_naming_the_field(objective, regime, other, field, expected):
    recipe = {"teacher": {"path": "builtin:arithmetic-teacher"}, "student": {"config": {}},
              "data": {"builtin": "arithmetic"}, "objective": objective, "regime": regime, **other}
    with pytest.raises(DistillError) as raised:
        load_recipe(recipe)
    text = str(raised.value)
    assert f"{field}: " in text and expected in text, text


def test_oracle_has_no_pairs(tiny_recipe, write_recipe, run_cli):
    done = run_cli("run", write_recipe({**tiny_recipe, "objective": {"loss": "dpo"}, "regime": {"kind": "preference"}}))
    assert done.returncode == 2 and "data.builtin" in done.stderr and "no preference pairs" in done.stderr


def test_distill_losses_names_the_recipe_field(run_cli):
    done = run_cli("losses")
    assert done.returncode == 0 and "regime.kind preference" in " ".join(done.stdout.split())


# ---- runs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", [{"loss": "dpo", "beta": 0.5}, {"loss": "redi", "alpha": 0.5},
                                       {"loss": "dckd", "rejected_weight": 0.5}], ids=["dpo", "redi", "dckd"])
def test_each_preference_loss_runs_through_the_cli(objective, write_recipe, run_cli, tmp_path):
    done = run_cli("run", write_recipe(_arithmetic(tmp_path, {**objective, "ce_weight": 0.5})))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _losses(tmp_path / "run")
    distilled = [r for r in records if r["phase"] == "distilled"]
    alone = [r for r in records if r["phase"] == "alone"]
    assert len(distilled) == 4 and len(alone) == 4
    for record in distilled:
        assert math.isfinite(record["kd"]) and record["loss"] == pytest.approx(record["kd"] + 0.5 * record["ce"],
                                                                                rel=1e-5)
    assert distilled[0]["ce"] == pytest.approx(alone[0]["loss"], rel=1e-6)  # same init and order: SFT on chosen
    if objective["loss"] == "dpo":
        assert distilled[0]["kd"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the initial student
        assert 0.0 <= distilled[-1]["reward_accuracy"] <= 1.0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["rows"]) == ["teacher", "alone", "distilled"]
    assert "exact_match" in results["rows"]["distilled"]


def test_pairs_from_a_jsonl_file_run_through_the_cli(write_recipe, run_cli, tmp_path):
    task = ArithmeticTask()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in task.preference_records(12, 3, "train")))
    recipe = _arithmetic(tmp_path, {"loss": "dpo"}, data={"builtin": None, "train": str(path), "eval_size": 4})
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([r for r in _losses(tmp_path / "run") if r["phase"] == "distilled"]) == 4


def _first_dpo_loss(tmp_path, name: str, **sections) -> float:
    import distill

    sections = {"train": {"steps": 1, "baseline": False}, "eval": {"every": 1, "generate_size": 0}, **sections}
    recipe = _arithmetic(tmp_path, {"loss": "dpo"}, **sections)
    recipe["output"] = str(tmp_path / name)
    distill.run(recipe)
    return _losses(tmp_path / name)[0]["kd"]


def test_dpo_reference_is_the_model_asked_for(tmp_path):
    teacher = {"path": "builtin:arithmetic-teacher"}
    # A student equal to the teacher: against the teacher as reference every margin is 0, the loss log 2.
    assert _first_dpo_loss(tmp_path, "same", student=teacher,
                           regime={"preference": {"reference": "teacher"}}) == pytest.approx(math.log(2), abs=1e-6)
    # Another student: log 2 against itself (initial), not against the teacher.
    assert _first_dpo_loss(tmp_path, "initial") == pytest.approx(math.log(2), abs=1e-6)
    assert abs(_first_dpo_loss(tmp_path, "teacher", regime={"preference": {"reference": "teacher"}})
               - math.log(2)) > 1e-3


def test_micro_batches_average_to_the_mean_over_pairs(tmp_path):
    """Two micro-batches of 2 pairs log the loss one micro-batch of the same 4 pairs does (DPO's mean over pairs)."""
    reference = {"preference": {"reference": "teacher"}}  # a loss that is not log 2 at the first step
    whole = _first_dpo_loss(tmp_path, "whole", regime=reference)
    accumulated = _first_dpo_loss(tmp_path, "accumulated", regime=reference,
                                  train={"steps": 1, "baseline": False, "batch_size": 2, "grad_accum": 2})
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_two_processes_train_as_one_with_their_batches_together(write_recipe, tmp_path):
    """DDP: each process's micro-batch is its share of the step's mean (the loss and gradient of 2 x 2 pairs
    are those of 4 pairs in one process)."""
    from conftest import launch_two_processes

    recipe = _arithmetic(tmp_path, {"loss": "dpo", "beta": 0.5, "ce_weight": 0.5},
                         regime={"preference": {"reference": "teacher"}},
                         train={"steps": 2, "baseline": False, "lr": 0.01}, eval={"every": 2, "generate_size": 0})
    one = write_recipe({**recipe, "output": str(tmp_path / "one")}, "one.yaml")
    two = write_recipe({**recipe, "output": str(tmp_path / "two"), "train": {**recipe["train"], "batch_size": 2}},
                       "two.yaml")
    import distill

    distill.run(str(one))
    launched = launch_two_processes("run", str(two))
    assert launched.returncode == 0, launched.stderr[-3000:]
    for single, double in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        for key in ("loss", "kd", "ce", "reward_margin", "grad_norm"):
            assert double[key] == pytest.approx(single[key], rel=1e-5), key


def test_lora_dpo_reference_is_the_base_model(tmp_path):
    pytest.importorskip("peft")
    student = {"path": "builtin:arithmetic-teacher", "lora": {"r": 2}}
    # fresh adapters leave the base function unchanged (B = 0): against the base the loss is log 2
    assert _first_dpo_loss(tmp_path, "lora", student=student) == pytest.approx(math.log(2), abs=1e-6)


def test_resumed_preference_run_ends_identical(tmp_path, monkeypatch):
    recipe = _arithmetic(tmp_path, {"loss": "dpo", "beta": 0.5, "ce_weight": 0.5})
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)

    def trained(run_dir):
        return [(r["phase"], r["step"], r["loss"], r["kd"], r["ce"], r["reward_margin"]) for r in _losses(run_dir)
                if r["phase"] == "distilled"]
    assert trained(straight.run_dir) == trained(resumed.run_dir)


def test_shipped_recipe_is_valid():
    from pathlib import Path

    path = Path(__file__).parent.parent / "recipes" / "arithmetic-preference.yaml"
    recipe = load_recipe(str(path))
    assert recipe.regime.kind == "preference" and recipe.objective.preference
    assert yaml.safe_load(path.read_text())["teacher"]["path"] == "builtin:arithmetic-teacher"


# ---- ADPA --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weaker_arithmetic_teacher(tmp_path_factory):
    """A causal LM of the arithmetic tokenizer that knows nothing (a random tiny Llama, save_pretrained): the
    aligned teacher's "reference" in the ADPA tests."""
    from transformers import AutoModelForCausalLM

    from distill.lm.models import load_tokenizer, tiny_llama_config

    directory = tmp_path_factory.mktemp("weak-arithmetic")
    tokenizer = load_tokenizer("builtin:arithmetic-teacher", "teacher.path")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_adpa_learns_from_the_teachers_advantage_on_the_students_samples(weaker_arithmetic_teacher, write_recipe,
                                                                         run_cli, tmp_path):
    recipe = _arithmetic(tmp_path, {"loss": "adpa", "ce_weight": 0.5},
                         regime={"preference": {"teacher_reference": str(weaker_arithmetic_teacher)}})
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    distilled = [r for r in _losses(tmp_path / "run") if r["phase"] == "distilled"]
    assert len(distilled) == 4
    for record in distilled:
        assert record["generated_tokens"] > 0 and math.isfinite(record["kd"])
        assert record["expected_advantage"] == pytest.approx(-record["kd"], rel=1e-6)
        assert record["loss"] == pytest.approx(record["kd"] + 0.5 * record["ce"], rel=1e-5)


def test_adpa_with_the_teacher_as_its_own_reference_has_no_advantage(tmp_path):
    import distill

    recipe = _arithmetic(tmp_path, {"loss": "adpa"}, train={"steps": 2, "baseline": False},
                         regime={"preference": {"teacher_reference": "builtin:arithmetic-teacher"}})
    distill.run(recipe)
    assert all(r["kd"] == 0.0 for r in _losses(tmp_path / "run") if r["phase"] == "distilled")


def test_adpa_needs_its_reference_and_others_refuse_it(tmp_path):
    with pytest.raises(DistillError, match="regime.preference.teacher_reference"):
        load_recipe(_arithmetic(tmp_path, {"loss": "adpa"}))
    with pytest.raises(DistillError, match="regime.preference.teacher_reference"):
        load_recipe(_arithmetic(tmp_path, {"loss": "dpo"},
                                regime={"preference": {"teacher_reference": "builtin:arithmetic-teacher"}}))


def test_resumed_adpa_run_ends_identical(weaker_arithmetic_teacher, tmp_path, monkeypatch):
    recipe = _arithmetic(tmp_path, {"loss": "adpa", "ce_weight": 0.5}, train={"baseline": False},
                         regime={"preference": {"teacher_reference": str(weaker_arithmetic_teacher)}})
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)
