"""`arithmetic`: `a + b =` prompts with verifiable answers, scored by exact match under greedy
generation. Every number is zero-padded to a fixed width and written least-significant digit
first, so answer digit i sits at a fixed distance from operand digits i (and the carry from
digit i-1): the order in which a left-to-right model can compute an addition. Digits are
space-separated so the word-level tokenizer sees one digit a token. (Measured here: with
unpadded operands a 1M-parameter teacher stayed at chance for 900 steps; with padded operands
written most-significant first it reached 1.6% exact match in 3000 steps.)"""
from __future__ import annotations

import numpy as np

from distill.lm.evaluate import greedy_exact_match
from distill.lm.tasks.vocab import word_level_tokenizer

NUM_DIGITS = 4


def format_problem(left: int, right: int) -> dict:
    """{'prompt': '2 1 0 0 + 4 3 0 0 =', 'completion': '6 4 0 0 0'} for 12 + 34 = 46 (4 digits)."""
    def digits(number: int, width: int) -> str:
        return " ".join(str(number).zfill(width)[::-1])
    return {"prompt": f"{digits(left, NUM_DIGITS)} + {digits(right, NUM_DIGITS)} =",
            "completion": digits(left + right, NUM_DIGITS + 1)}


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion is the correct sum of the prompt's problem, else 0.0 (verifiable)."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        try:
            left, right = (int("".join(part.split())[::-1]) for part in prompt.rstrip("= ").split("+"))
        except ValueError:
            scores.append(0.0)
            continue
        scores.append(float(completion.strip() == format_problem(left, right)["completion"]))
    return scores


class ArithmeticTask:
    """Addition of up to `NUM_DIGITS`-digit numbers; metric: exact match of greedy answers."""

    name = "arithmetic"
    metric = "exact_match"
    higher_is_better = True
    append_eos = True  # the model must learn to stop after the answer
    reward = staticmethod(reward)  # the verifiable sequence reward of regime opd
    teacher_config = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)

    def tokenizer(self):
        return word_level_tokenizer([str(d) for d in range(10)] + ["+", "="])

    def records(self, count: int, seed: int, split: str) -> list[dict]:
        """Seeded problems; eval problems never appear in the train split of the same seed."""
        stream = {"train": 0, "eval": 1}[split]
        rng = np.random.default_rng([seed, stream])
        high = 10 ** NUM_DIGITS
        held_out = set()
        if split == "train":  # exclude the eval problems of this seed (they are few)
            eval_rng = np.random.default_rng([seed, 1])
            held_out = {tuple(p) for p in eval_rng.integers(0, high, size=(count, 2)).tolist()}
        problems = []
        while len(problems) < count:
            pair = tuple(rng.integers(0, high, size=2).tolist())
            if pair not in held_out:
                problems.append(format_problem(*pair))
        return problems

    def evaluate(self, model, tokenizer, records: list[dict], *, batch_size: int, generate_size: int,
                 seed: int) -> dict[str, float]:
        """Fraction of the first `generate_size` eval problems answered exactly (greedy)."""
        if generate_size == 0:
            return {}
        return {"exact_match": greedy_exact_match(model, tokenizer, records[:generate_size], batch_size=batch_size,
                                                  max_new_tokens=NUM_DIGITS + 2)}  # the answer and EOS
