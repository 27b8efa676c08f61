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


def digits(number: int, width: int) -> str:
    """'2 1 0 0' for 12 at width 4: zero-padded, least-significant digit first, space-separated."""
    return " ".join(str(number).zfill(width)[::-1])


def format_problem(left: int, right: int) -> dict:
    """{'prompt': '2 1 0 0 + 4 3 0 0 =', 'completion': '6 4 0 0 0'} for 12 + 34 = 46 (4 digits)."""
    return {"prompt": f"{digits(left, NUM_DIGITS)} + {digits(right, NUM_DIGITS)} =",
            "completion": digits(left + right, NUM_DIGITS + 1)}


def wrong_sum(left: int, right: int, rng: np.random.Generator) -> int:
    """A plausible wrong answer to left + right: with probability 1/2 (when the sum carries) the carries
    dropped (each digit the sum of the operands' digits mod 10), else one digit of the sum off by one
    (+-10^k at a random place k, the sign that keeps the answer in range). Never the sum itself."""
    total = left + right
    pairs = zip(str(left).zfill(NUM_DIGITS), str(right).zfill(NUM_DIGITS))
    dropped = int("".join(str((int(a) + int(b)) % 10) for a, b in pairs))
    if dropped != total and rng.random() < 0.5:
        return dropped
    step = 10 ** int(rng.integers(0, NUM_DIGITS + 1))
    sign = 1 if rng.random() < 0.5 else -1
    return total + sign * step if 0 <= total + sign * step < 10 ** (NUM_DIGITS + 1) else total - sign * step


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
        return [format_problem(*pair) for pair in self.problems(count, seed, split)]

    def preference_records(self, count: int, seed: int, split: str) -> list[dict]:
        """The problems of `records` as preference pairs: {prompt, chosen: the correct answer, rejected: a
        plausible wrong one (`wrong_sum`)}, the wrong answers seeded by (seed, split) too."""
        rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split], 2])
        rows = []
        for left, right in self.problems(count, seed, split):
            problem = format_problem(left, right)
            rows.append({"prompt": problem["prompt"], "chosen": problem["completion"],
                         "rejected": digits(wrong_sum(left, right, rng), NUM_DIGITS + 1)})
        return rows

    def problems(self, count: int, seed: int, split: str) -> list[tuple[int, int]]:
        """The seeded operand pairs of `records`."""
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
                problems.append(pair)
        return problems

    def evaluate(self, model, tokenizer, records: list[dict], *, batch_size: int, generate_size: int,
                 seed: int) -> dict[str, float]:
        """Fraction of the first `generate_size` eval problems answered exactly (greedy)."""
        if generate_size == 0:
            return {}
        return {"exact_match": greedy_exact_match(model, tokenizer, records[:generate_size], batch_size=batch_size,
                                                  max_new_tokens=NUM_DIGITS + 2)}  # the answer and EOS
