"""On-policy distillation (GKD): with probability lmbda a micro-batch's completions are sampled
from the current student and scored by the teacher. lmbda = 0 is exactly off-policy; samples are
reproducible across a resume; bad input is refused before training."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import distill
from conftest import assert_same_student, run_interrupted_and_resumed
from distill.lm.data import Example
from distill.lm.regimes import prompt_of, sampling_generator


def _weights(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _prompt_rows(path, count=24):
    """prompt/completion rows in the oracle tokenizer's words (the tiny teacher's vocabulary)."""
    rows = [{"prompt": " ".join(f"w{(i + j) % 64}" for j in range(3)),
             "completion": " ".join(f"w{(i * 7 + j) % 64}" for j in range(2 + i % 4))} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _on_policy(tiny_recipe, tmp_path, **regime):
    data = {"train": _prompt_rows(tmp_path / "train.jsonl"), "eval": _prompt_rows(tmp_path / "eval.jsonl", 8)}
    return {**tiny_recipe, "data": data, "regime": {"kind": "on_policy", **regime},
            "train": {**tiny_recipe["train"], "baseline": False}}


def test_prompt_is_everything_before_the_first_loss_token():
    assert prompt_of(Example([1, 5, 6, 7, 2], [-100, -100, -100, 7, 2])) == [1, 5, 6]
    assert prompt_of(Example([1, 5, 6], [1, 5, 6])) == [1]  # a text row: sampled from BOS


def test_sampling_generator_depends_on_every_coordinate():
    draws = {tuple(torch.rand(3, generator=sampling_generator(*key)).tolist())
             for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]}
    assert len(draws) == 5
    assert torch.equal(torch.rand(3, generator=sampling_generator(0, 5, 1, 0)),
                       torch.rand(3, generator=sampling_generator(0, 5, 1, 0)))


def test_lmbda_zero_is_exactly_off_policy(tiny_recipe, tmp_path):
    recipe = _on_policy(tiny_recipe, tmp_path, lmbda=0.0)
    on = distill.run({**recipe, "output": str(tmp_path / "on")})
    off = distill.run({**recipe, "regime": {"kind": "off_policy"}, "output": str(tmp_path / "off")})
    for key, value in _weights(off.run_dir).items():
        assert torch.equal(value, _weights(on.run_dir)[key]), key


def test_on_policy_run_through_the_cli_samples_every_batch(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(_on_policy(tiny_recipe, tmp_path, lmbda=1.0, max_new_tokens=6))
    done = run_cli("run", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["sampled_batches"] == 1 and 4 <= record["generated_tokens"] <= 4 * 6
        assert record["generate_seconds"] > 0 and record["teacher_seconds"] > 0 and record["kd"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Median step time: distilled" in report and "generate" in report


def test_resumed_on_policy_run_samples_the_same_and_ends_identical(tiny_recipe, tmp_path, monkeypatch):
    recipe = _on_policy(tiny_recipe, tmp_path, lmbda=0.5, max_new_tokens=5)
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)

    def sampled(run_dir):
        return [json.loads(line)["sampled_batches"] for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert sampled(straight.run_dir) == sampled(resumed.run_dir)


def test_on_policy_refuses_data_without_prompts_and_completions_past_the_context(tiny_recipe, write_recipe, run_cli,
                                                                                 tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(20)))
    recipe = {**tiny_recipe, "data": {"train": str(text), "eval_size": 4}, "regime": {"kind": "on_policy"}}
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 2 and "data.train" in done.stderr and "prompt" in done.stderr
    long = write_recipe(_on_policy(tiny_recipe, tmp_path, max_new_tokens=1000), "long.yaml")
    done = run_cli("run", long)
    assert done.returncode == 2 and "regime.max_new_tokens" in done.stderr
