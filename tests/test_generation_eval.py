"""Scoring by generating: chat `messages` data gets ROUGE-L F1 of the generated answer as its primary metric,
the report shows example generations of every model side by side and per-token histograms, and
eval.sample_temperature samples reproducibly without touching the training random state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start> {{ m['role'] }} {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}<start> assistant {% endif %}")


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny teacher with a chat template on its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("chat_teacher")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).save_pretrained(directory)
    return directory


def _conversations(count: int, offset: int = 0) -> list[dict]:
    return [{"conversations": [{"role": "user", "content": f"w{(i + offset) % 7} w{(i + offset) % 5}"},
                               {"role": "assistant", "content": f"w{(i + offset) % 4 + 10} w{i % 3 + 20} w30"}]}
            for i in range(count)]


@pytest.fixture
def chat_dataset(tmp_path) -> Path:
    """A DatasetDict of chat rows under a `conversations` column, written by save_to_disk."""
    import datasets

    directory = tmp_path / "chat"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_conversations(24)),
                          "test": datasets.Dataset.from_list(_conversations(6, offset=50))}).save_to_disk(directory)
    return directory


def test_chat_data_is_scored_by_rouge_l_with_generations_in_the_report(tiny_recipe, chat_teacher, chat_dataset,
                                                                      write_recipe, run_cli):
    recipe = {**tiny_recipe, "teacher": {"path": str(chat_teacher)},
              "data": {"train": str(chat_dataset), "eval_split": "test", "fields": {"messages": "conversations"}},
              "eval": {**tiny_recipe["eval"], "generate_size": 6}}
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(recipe["output"])
    results = json.loads((run / "results.json").read_text())
    meta = results["meta"]
    assert meta["primary_metric"] == "rouge_l" and meta["higher_is_better"]
    for row in ("teacher", "alone", "distilled"):
        assert 0.0 <= results["rows"][row]["rouge_l"] <= 1.0 and "exact_match" in results["rows"][row]
        assert len(meta["generations"][row]) == 3
    # the references are the assistant turns of the eval split; the prompts went through the chat template
    assert meta["generations"]["reference"] == [c["conversations"][-1]["content"] for c in _conversations(3, 50)]
    assert meta["generations"]["prompt"] == [f"user: {c['conversations'][0]['content']}" for c in _conversations(3, 50)]
    html = (run / "report.html").read_text()
    assert "Example generations" in html and meta["generations"]["reference"][0] in html
    assert "ROUGE-L" in result.stdout
    assert (run / "plots" / "token_kl.png").is_file()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rouge_l" in record for record in evals)  # the curves of the report


def test_text_data_cannot_ask_for_a_generated_metric(tiny_recipe, tmp_path, write_recipe, run_cli):
    rows = [{"text": f"w{i % 9} w{i % 4} w{i % 6}"} for i in range(30)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**tiny_recipe, "data": {"train": str(tmp_path / "text.jsonl"), "eval_size": 6},
              "eval": {**tiny_recipe["eval"], "metric": "rouge_l"}}
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 2 and "eval.metric" in result.stderr
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_sampled_generations_are_seeded_and_leave_the_random_state_alone(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.evaluate import generate_completions

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompts = [tokenizer("w1 w2").input_ids, tokenizer("w3").input_ids] * 4
    options = {"batch_size": 4, "max_new_tokens": 8}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    greedy = generate_completions(model, tokenizer, prompts, **options)
    assert greedy == generate_completions(model, tokenizer, prompts, **options, seed=5)  # greedy ignores the seed
    sampled = generate_completions(model, tokenizer, prompts, **options, temperature=1.0, seed=5)
    assert sampled == generate_completions(model, tokenizer, prompts, **options, temperature=1.0, seed=5)
    assert sampled != generate_completions(model, tokenizer, prompts, **options, temperature=1.0, seed=6)
    assert sampled != greedy
    assert torch.equal(torch.get_rng_state(), state)  # training draws are not shifted by evaluation
