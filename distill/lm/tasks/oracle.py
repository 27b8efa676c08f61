"""`oracle`: a random hidden-Markov "oracle language" whose next-token distribution is exact.

For any prefix the forward algorithm gives p_oracle(x_t | x_<t), so a model's forward KL to the
truth (on oracle samples) and reverse KL (on the model's own samples) are computed exactly, not
estimated against a teacher. Sparse Dirichlet rows (0.02 transitions, 0.05 emissions) give the
language structure worth learning; with 0.1-0.3 there is almost none (measured when planning).
"""
from __future__ import annotations

import numpy as np
import torch

from distill.lm.tasks.vocab import SPECIAL_TOKENS, word_level_tokenizer

NUM_STATES = 32
NUM_SYMBOLS = 64
SEQUENCE_LENGTH = 64
TRANSITION_CONCENTRATION = 0.02
EMISSION_CONCENTRATION = 0.05
EMISSION_FLOOR = 1e-6  # mixed into emissions so every symbol has non-zero probability (finite KLs)
HMM_SEED = 0  # the oracle itself is fixed; `data.seed` only changes which sequences are drawn
FIRST_SYMBOL_ID = len(SPECIAL_TOKENS)


class HiddenMarkovOracle:
    """An HMM over `NUM_SYMBOLS` symbols with exact next-symbol probabilities for any prefix."""

    def __init__(self, seed: int = HMM_SEED, num_states: int = NUM_STATES, num_symbols: int = NUM_SYMBOLS):
        rng = np.random.default_rng(seed)
        self.initial = rng.dirichlet(np.full(num_states, 1.0))
        self.transition = rng.dirichlet(np.full(num_states, TRANSITION_CONCENTRATION), size=num_states)
        emission = rng.dirichlet(np.full(num_symbols, EMISSION_CONCENTRATION), size=num_states)
        self.emission = (1 - EMISSION_FLOOR) * emission + EMISSION_FLOOR / num_symbols
        # Dirichlet rows with tiny concentration can underflow to exact zeros: renormalise.
        self.transition = self.transition / self.transition.sum(1, keepdims=True)

    def sample(self, count: int, length: int, seed: int | list[int]) -> np.ndarray:
        """`count` symbol sequences of `length`, as an int array [count, length]."""
        rng = np.random.default_rng(seed)
        num_states, num_symbols = self.emission.shape
        states = rng.choice(num_states, size=count, p=self.initial)
        symbols = np.empty((count, length), dtype=np.int64)
        for t in range(length):
            # Inverse-CDF sampling, vectorised over sequences.
            symbols[:, t] = _sample_rows(self.emission[states], rng)
            states = _sample_rows(self.transition[states], rng)
        return symbols

    def next_symbol_probs(self, symbols: np.ndarray) -> np.ndarray:
        """p(x_t | x_<t) for t = 0..L-1 by the forward algorithm: float64 [count, L, num_symbols]."""
        count, length = symbols.shape
        belief = np.tile(self.initial, (count, 1))  # P(state_t | x_<t)
        probs = np.empty((count, length, self.emission.shape[1]))
        for t in range(length):
            probs[:, t] = belief @ self.emission
            belief = belief * self.emission[:, symbols[:, t]].T
            belief = belief / belief.sum(1, keepdims=True)
            belief = belief @ self.transition
        return probs


def _sample_rows(prob_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cumulative = prob_rows.cumsum(1)
    draws = rng.random((prob_rows.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(1), prob_rows.shape[1] - 1)


class OracleTask:
    """Sequences from the oracle as `text` records; metrics are exact KLs to the oracle."""

    name = "oracle"
    higher_is_better = False
    append_eos = False  # fixed-length language: the oracle defines no end-of-sequence
    teacher_config = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)

    def __init__(self):
        self.oracle = HiddenMarkovOracle()

    def tokenizer(self):
        return word_level_tokenizer([f"w{s}" for s in range(NUM_SYMBOLS)])

    def records(self, count: int, seed: int, split: str) -> list[dict]:
        """Seeded oracle samples; train and eval splits use disjoint seed streams."""
        stream = {"train": 0, "eval": 1}[split]
        symbols = self.oracle.sample(count, SEQUENCE_LENGTH, seed=[seed, stream])
        return [{"text": " ".join(f"w{s}" for s in row)} for row in symbols]

    per_symbol = False  # also (or, for another tokenizer, only) the tokenization-free metrics per symbol

    @property
    def metric(self) -> str:
        return "oracle_kl_per_symbol" if self.per_symbol else "oracle_forward_kl"

    def speaks_symbols(self, tokenizer) -> bool:
        """Whether `tokenizer` is the task's own (one token per symbol, the ids the exact metrics read)."""
        return tokenizer.get_vocab() == self.tokenizer().get_vocab()

    @torch.no_grad()
    def evaluate(self, model, tokenizer, records: list[dict], *, batch_size: int, generate_size: int,
                 seed: int) -> dict[str, float]:
        """Exact forward KL(oracle||model) on oracle samples, reverse KL(model||oracle) on model
        samples, and the oracle's entropy (the floor of any model's NLL), all in nats per token. With
        `per_symbol` (cross-tokenizer runs) or a tokenizer other than the task's, the metrics of any tokenizer
        (`per_symbol_metrics`) too; the per-token ones need the task's tokenizer."""
        symbols = np.array([[int(w[1:]) for w in r["text"].split()] for r in records])
        metrics = {}
        if self.per_symbol or not self.speaks_symbols(tokenizer):
            metrics.update(self.per_symbol_metrics(model, tokenizer, symbols, batch_size))
            if not self.speaks_symbols(tokenizer):
                return metrics
        return {**metrics, **self._exact(model, symbols, batch_size, generate_size, seed)}

    @torch.no_grad()
    def per_symbol_metrics(self, model, tokenizer, symbols: np.ndarray, batch_size: int) -> dict[str, float]:
        """Metrics of a model with any tokenizer, per oracle symbol, on the eval sequences x (written as text
        `w3 w17 ...` and tokenized canonically, with the tokenizer's BOS):
          oracle_nll_per_symbol = -log q(tok(x)) / L
          oracle_kl_per_symbol  = (log p_oracle(x) - log q(tok(x))) / L, averaged over the eval sequences
        The second estimates KL(p_oracle || q_canonical) per symbol, where q_canonical(x) is the probability the
        model gives x's canonical tokenization: an upper bound of the KL to the model's marginal over all
        tokenizations of x (which also count toward x). The exact log p_oracle(x) comes from the forward algorithm."""
        device = next(model.parameters()).device
        oracle_probs = self.oracle.next_symbol_probs(symbols)
        oracle_logprob = np.log(np.take_along_axis(oracle_probs, symbols[..., None], -1)[..., 0]).sum(1)
        texts = [" ".join(f"w{s}" for s in row) for row in symbols]
        model_logprob = []
        pad = tokenizer.pad_token_id or 0
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(text).input_ids for text in texts[start:start + batch_size]]
            width = max(map(len, encoded))
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in encoded], device=device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded], device=device)
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
            token = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            model_logprob += token.sum(1).tolist()
        length = symbols.shape[1]
        model_logprob = np.array(model_logprob)
        return {"oracle_nll_per_symbol": float(-model_logprob.mean() / length),
                "oracle_kl_per_symbol": float((oracle_logprob - model_logprob).mean() / length),
                "oracle_entropy_per_symbol": float(-oracle_logprob.mean() / length)}  # the nll's floor here

    def _exact(self, model, symbols: np.ndarray, batch_size: int, generate_size: int, seed: int) -> dict[str, float]:
        oracle_probs = self.oracle.next_symbol_probs(symbols)
        forward_kl, entropy = 0.0, 0.0
        for start in range(0, len(symbols), batch_size):
            chunk = torch.as_tensor(symbols[start:start + batch_size])
            model_logprobs = _symbol_logprobs(model, chunk, renormalise=False)  # [n, L, symbols]
            truth = torch.as_tensor(oracle_probs[start:start + batch_size])
            forward_kl += (truth * (truth.log() - model_logprobs)).sum().item()
            entropy += -(truth * truth.log()).sum().item()
        num_tokens = symbols.size
        metrics = {"oracle_forward_kl": forward_kl / num_tokens, "oracle_entropy": entropy / num_tokens}
        if generate_size > 0:
            metrics["oracle_reverse_kl"] = self._reverse_kl(model, generate_size, batch_size, seed)
        return metrics

    def make_bpe_student(self, directory, *, vocab_size: int = 400, hidden_size: int = 64, num_hidden_layers: int = 2,
                         seed: int = 0, symbols: bool = False) -> None:
        """Save a randomly initialised (seeded) Llama student that reads the oracle through `student_tokenizer`
        (or, `symbols`, one token per symbol: the student of the other direction, against a BPE teacher from
        `distill train-teacher builtin:oracle --tokenizer bpe`). The shipped `builtin:oracle-bpe-student` is
        `make_bpe_student("distill/assets/oracle-bpe-student")`."""
        import json
        from pathlib import Path

        from distill.lm.tokenizer_zoo import tiny_causal_lm

        tokenizer = self.tokenizer() if symbols else self.student_tokenizer(vocab_size)
        model = tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, seed=seed)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        card = {"what": "an untrained student for the two-tokenizer oracle (cross-tokenizer KD)",
                "parameters": sum(p.numel() for p in model.parameters()), "tokens": len(tokenizer),
                "command": f'python -c "from distill.lm.tasks.oracle import OracleTask; OracleTask().make_bpe_student('
                           f"'{directory}', vocab_size={vocab_size}, hidden_size={hidden_size}, "
                           f'num_hidden_layers={num_hidden_layers}, seed={seed}, symbols={symbols})"'}
        (Path(directory) / "student_card.json").write_text(json.dumps(card, indent=1))

    def student_tokenizer(self, vocab_size: int = 400, *, size: int = 2000, seed: int = 0):
        """A byte-level BPE over the oracle's text (`w3 w17 ...`), trained offline on oracle samples: its tokens
        are pieces of symbols and runs of several, so a student with it sees the language another way than the
        teacher (one token per symbol). The two-tokenizer oracle of cross-tokenizer KD."""
        from distill.lm.tokenizer_zoo import build_tokenizer

        corpus = [record["text"] for record in self.records(size, seed=1000 + seed, split="train")]
        return build_tokenizer("bytelevel_bpe", corpus, vocab_size=vocab_size)

    def _reverse_kl(self, model, count: int, batch_size: int, seed: int) -> float:
        """KL(model||oracle) per token, exact at every prefix of the model's own samples.

        The model samples from its distribution restricted to the symbols (special tokens are
        outside the oracle's support) and renormalised; the same restriction is scored."""
        total, num_tokens = 0.0, 0
        for start in range(0, count, batch_size):
            rows = min(batch_size, count - start)
            sampled = _sample_symbols(model, rows, SEQUENCE_LENGTH, seed=seed * 100003 + start)
            model_logprobs = _symbol_logprobs(model, sampled, renormalise=True)
            truth = torch.as_tensor(self.oracle.next_symbol_probs(sampled.numpy()))
            total += (model_logprobs.exp() * (model_logprobs - truth.log())).sum().item()
            num_tokens += sampled.numel()
        return total / num_tokens


def _with_bos(symbols: torch.Tensor, device) -> torch.Tensor:
    bos = torch.full((symbols.shape[0], 1), SPECIAL_TOKENS.index("<bos>"), dtype=torch.long)
    return torch.cat([bos, symbols + FIRST_SYMBOL_ID], 1).to(device)


def _symbol_logprobs(model, symbols: torch.Tensor, renormalise: bool) -> torch.Tensor:
    """log p_model(symbol | prefix) at every position [n, L, NUM_SYMBOLS], float64.

    Without renormalisation these are the model's full-vocabulary log-probs of the symbols
    (mass it puts on special tokens counts as error, as it should for forward KL)."""
    device = next(model.parameters()).device
    logits = model(input_ids=_with_bos(symbols, device)[:, :-1]).logits.double()
    if renormalise:
        return torch.log_softmax(logits[..., FIRST_SYMBOL_ID:FIRST_SYMBOL_ID + NUM_SYMBOLS], -1).cpu()
    return torch.log_softmax(logits, -1)[..., FIRST_SYMBOL_ID:FIRST_SYMBOL_ID + NUM_SYMBOLS].cpu()


def _sample_symbols(model, count: int, length: int, seed: int) -> torch.Tensor:
    """Ancestral samples from the model restricted to symbols (special tokens suppressed)."""
    device = next(model.parameters()).device
    prompt = _with_bos(torch.empty(count, 0, dtype=torch.long), device)
    # Only symbols may be drawn: not special tokens, nor padded embedding rows past the vocabulary.
    rows = model.get_output_embeddings().weight.shape[0]
    outside = list(range(FIRST_SYMBOL_ID)) + list(range(FIRST_SYMBOL_ID + NUM_SYMBOLS, rows))
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the training RNG
        torch.manual_seed(seed)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                                   min_new_tokens=length, suppress_tokens=outside, synced_gpus=False,
                                   pad_token_id=0)
    return generated[:, 1:].cpu() - FIRST_SYMBOL_ID
