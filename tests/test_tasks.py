"""Built-in tasks: the oracle's exact probabilities against brute force, its metrics against an
independent estimate, and arithmetic scoring by generation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.lm.data import tokenize
from distill.lm.evaluate import greedy_exact_match, token_metrics
from distill.core.assets import ASSETS
from distill.lm.tasks.arithmetic import ArithmeticTask, format_problem
from distill.lm.tasks.oracle import HiddenMarkovOracle, OracleTask


def _brute_force_next_symbol_probs(oracle: HiddenMarkovOracle, symbols: list[int]) -> np.ndarray:
    """p(x_t | x_<t) = P(x_<=t) / P(x_<t), each P a sum over every hidden state path."""
    num_states, num_symbols = oracle.emission.shape

    def prefix_probability(prefix):
        total = 0.0
        for path in itertools.product(range(num_states), repeat=len(prefix)):
            p = oracle.initial[path[0]] if path else 1.0
            for t, (state, symbol) in enumerate(zip(path, prefix)):
                if t > 0:
                    p *= oracle.transition[path[t - 1], state]
                p *= oracle.emission[state, symbol]
            total += p
        return total

    rows = []
    for t in range(len(symbols)):
        base = prefix_probability(symbols[:t])
        rows.append([prefix_probability(symbols[:t] + [v]) / base for v in range(num_symbols)])
    return np.array(rows)


def test_forward_algorithm_equals_brute_force_enumeration():
    oracle = HiddenMarkovOracle(seed=3, num_states=3, num_symbols=4)
    sequences = oracle.sample(5, 4, seed=0)
    exact = oracle.next_symbol_probs(sequences)
    for row, sequence in enumerate(sequences.tolist()):
        np.testing.assert_allclose(exact[row], _brute_force_next_symbol_probs(oracle, sequence), rtol=1e-10)
    np.testing.assert_allclose(exact.sum(-1), 1.0, rtol=1e-12)


def test_samples_follow_the_oracle():
    oracle = HiddenMarkovOracle(seed=1, num_states=4, num_symbols=5)
    first = oracle.sample(40000, 2, seed=0)[:, 0]
    expected = oracle.initial @ oracle.emission
    observed = np.bincount(first, minlength=5) / len(first)
    np.testing.assert_allclose(observed, expected, atol=0.01)


def test_oracle_records_are_seeded_and_splits_differ():
    task = OracleTask()
    assert task.records(4, 0, "train") == task.records(4, 0, "train")
    assert task.records(4, 0, "train") != task.records(4, 0, "eval")
    assert task.records(4, 0, "train") != task.records(4, 1, "train")


@pytest.fixture(scope="module")
def oracle_teacher():
    return AutoModelForCausalLM.from_pretrained(ASSETS / "oracle-teacher").eval()


def test_exact_forward_kl_agrees_with_nll_minus_entropy(oracle_teacher):
    """E[NLL] - H(oracle) = KL(oracle || model) in expectation over oracle samples: the exact
    metric must agree with this independent Monte-Carlo estimate."""
    task = OracleTask()
    tokenizer = task.tokenizer()
    records = task.records(100, seed=5, split="eval")
    metrics = task.evaluate(oracle_teacher, tokenizer, records, batch_size=50, generate_size=8, seed=0)
    examples = tokenize(records, tokenizer, max_length=128, too_long="refuse", completion_only=True,
                        append_eos=False, field="data.eval")
    nll = token_metrics(oracle_teacher, examples, vocab_size=len(tokenizer), batch_size=50,
                        pad_token_id=tokenizer.pad_token_id)["nll"]
    assert 0 < metrics["oracle_forward_kl"] < 0.1  # the shipped teacher is close to the truth
    assert metrics["oracle_forward_kl"] == pytest.approx(nll - metrics["oracle_entropy"], abs=0.02)
    assert 0 < metrics["oracle_reverse_kl"] < 0.3


def test_arithmetic_format_puts_least_significant_digits_first():
    assert format_problem(12, 34) == {"prompt": "2 1 0 0 + 4 3 0 0 =", "completion": "6 4 0 0 0"}
    assert format_problem(9999, 1)["completion"] == "0 0 0 0 1"
    task = ArithmeticTask()
    train, evaluation = task.records(500, 0, "train"), task.records(50, 0, "eval")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}


def test_greedy_exact_match_scores_by_generating():
    teacher_dir = ASSETS / "arithmetic-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    problems = ArithmeticTask().records(16, seed=3, split="eval")
    assert greedy_exact_match(model, tokenizer, problems, batch_size=8, max_new_tokens=6) == 1.0
    wrong = [{**p, "completion": p["completion"][::-1] + " 1"} for p in problems]
    assert greedy_exact_match(model, tokenizer, wrong, batch_size=8, max_new_tokens=6) == 0.0
