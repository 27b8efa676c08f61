"""Batched sampling from a causal LM with a KV cache, for on-policy distillation and sequence-level KD.

On-policy KD has the student sample completions that the teacher then scores; sequence-level KD has the
teacher generate completions once. Both need a batch of prompts turned into prompt + completion rows with
exact masks, so `sample` returns a `Generation` whose `to_examples()` trains like prompt/completion data.

Why not `model.generate`: we need per-token control (temperature, top-p over the tokenizer's real
vocabulary only, per-row EOS stop), masks that say exactly which tokens were generated, reproducible
draws from a caller's `torch.Generator`, and low overhead on CPU. The decoding loop is a few lines on
top of the model's own forward, so we write it here.

How it works:
- Left padding: prompts of different lengths are right-aligned into a [B, P] block so that every row's
  next token is at column -1. Padding gets attention mask 0, and positions come from the mask
  (`cumsum - 1`, clamped at 0), so a row's first real token is at position 0 whatever its padding;
  the model sees the positions of the unpadded prompt (which absolute-position embeddings and the
  `max_position_embeddings` limit depend on).
- KV cache: one forward over the padded prompts fills the cache (only the last position's logits are
  kept), then one forward per new token feeds just that token, its position, the cache and the
  attention mask extended by one column. A row that has stopped keeps being fed pad tokens with mask 0
  (the batch shape must stay rectangular for the cache); its positions no longer advance.
- A row stops after it emits EOS (EOS is part of its completion); the loop ends when every row stopped
  or after `max_new_tokens`.

Measured speed (the `tiny_lm_dir` test teacher: Llama, oracle vocabulary of 68, hidden 32, 2 layers, 4 heads;
batch 32, 64 new tokens, sampling, one CPU thread, torch 2.13, transformers 5.24, machine shared with a CI run):
9,000-12,000 generated tokens/s (hidden 64: ~8,000); `model.generate(do_sample=True)` on the same: ~8,000.
At this size the per-step Python and mask overhead of the forward dominates, not the matmuls.

transformers quirks: from 5.x the forward argument and output field are `cache`, and `past_key_values` is a
deprecated alias that logs a warning (even on read), so the name is picked from the forward's signature. With
RoPE, attention depends only on position differences, so wrong-but-shifted position ids give the same Llama
tokens; the ids are still computed from the mask for models with absolute positions.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from distill.lm.data import IGNORE_INDEX, Example


@dataclass
class Generation:
    """Prompts and their sampled completions, left-padded into one block."""

    sequences: torch.Tensor  # [B, P + N] long: left-padded prompts, then generated tokens (pad after a row stops)
    attention_mask: torch.Tensor  # [B, P + N] long: 1 on real prompt tokens and on completions up to and incl. EOS
    completion_mask: torch.Tensor  # [B, P + N] bool: True exactly on generated tokens up to and including EOS
    prompt_length: int  # P, the padded prompt width
    new_tokens: int  # generated tokens that count (sum of completion_mask)
    seconds: float
    replaced: int = 0  # reverse speculative decoding: proposals replaced by the filter model's own tokens

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens that count, per wall-clock second of `sample`."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def completions(self) -> list[list[int]]:
        """Per row, the generated ids up to and including EOS."""
        tail, mask = self.sequences[:, self.prompt_length:], self.completion_mask[:, self.prompt_length:]
        return [row[keep].tolist() for row, keep in zip(tail, mask)]

    def prompts(self) -> list[list[int]]:
        """Per row, the prompt ids without padding."""
        head, mask = self.sequences[:, :self.prompt_length], self.attention_mask[:, :self.prompt_length].bool()
        return [row[keep].tolist() for row, keep in zip(head, mask)]

    def to_examples(self) -> list[Example]:
        """One Example per row: prompt + completion, with loss only on the completion (id = row index)."""
        return [Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, str(index))
                for index, (prompt, completion) in enumerate(zip(self.prompts(), self.completions()))]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):  # parameter-free wrappers (tests) run on CPU
        return torch.device("cpu")


def _forward_parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(output):
    """The KV cache of a forward's output, under its 5.x name `cache` or the older `past_key_values`."""
    if isinstance(output, dict):  # ModelOutput: looking up the old name logs a deprecation
        return output["cache"] if "cache" in output else output.get("past_key_values")
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` [B, V] restricted to each row's smallest set of tokens whose mass reaches `top_p`, renormalised.

    The most likely token is always kept, so a tiny `top_p` means greedy rather than an empty set."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # exclusive cumsum: the top token has 0 < top_p
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [B, V]: argmax if greedy (or temperature 0), else a draw from the
    temperature-scaled, nucleus-restricted softmax using `generator`."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model, prompts, max_new_tokens: int, temperature: float, top_p: float, vocab_size: int | None) -> None:
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    empty = [index for index, prompt in enumerate(prompts) if len(prompt) == 0]
    if empty:
        raise ValueError(f"prompts: rows {empty[:5]} are empty; a causal LM needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(prompt) for prompt in prompts)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} plus the longest prompt ({longest} tokens) is "
                         f"{longest + max_new_tokens}, over the model's max_position_embeddings={limit}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")


class _Decoder:
    """One model's side of the decoding loop: its KV cache and the logits of the last position."""

    def __init__(self, model, input_ids: torch.Tensor, mask: torch.Tensor):
        self.model = model
        parameters = _forward_parameters(model)
        self.cache_name = ("past_key_values" if "past_key_values" in parameters and "cache" not in parameters
                           else "cache")
        # Only the last position's logits are needed: skip the [B, P, V] head output when the model allows it.
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.output = model(input_ids=input_ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **self.extra)

    @property
    def logits(self) -> torch.Tensor:
        return self.output.logits[:, -1, :]

    def feed(self, token: torch.Tensor, mask: torch.Tensor) -> None:
        # Same rule as for the prompt: a stopped row's position freezes, harmless as its token is masked.
        position = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        self.output = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                                 **{self.cache_name: _cache_of(self.output)})


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
           temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           greedy: bool = False, vocab_size: int | None = None, filter_model=None,
           filter_threshold: float = 0.0) -> Generation:
    """Complete each prompt (token ids, unpadded, non-empty) with up to `max_new_tokens` tokens.

    Sampling divides logits by `temperature` and keeps the `top_p` nucleus; `greedy=True` or
    `temperature=0` takes the argmax instead. Draws use `generator` (same seed, same tokens). A row
    stops after `eos_token_id` (None: never). `vocab_size` restricts choices to the first
    `vocab_size` logits (output rows beyond the tokenizer's vocabulary). The model runs in eval mode
    and gets its train/eval mode back on return. Raises ValueError on bad arguments.

    Reverse speculative decoding (student-aware filtering): with `filter_model` (the student, same
    vocabulary), `model` proposes each token as above, and a proposal whose probability under
    `filter_model` (softmax at temperature 1) is below `filter_threshold` is replaced by a token drawn
    from `filter_model` with the same temperature / top-p / greedy rule. Both models see the chosen
    tokens. `Generation.replaced` counts the replaced tokens."""
    _check(model, prompts, max_new_tokens, temperature, top_p, vocab_size)
    if filter_model is not None and not 0 <= filter_threshold <= 1:
        raise ValueError(f"filter_threshold is a probability in [0, 1], got {filter_threshold}")
    started = time.perf_counter()
    device = _model_device(model)
    batch, width = len(prompts), max(len(prompt) for prompt in prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    models = [model] + ([filter_model] if filter_model is not None else [])
    modes = [getattr(m, "training", False) for m in models]
    for m in models:
        m.eval()
    replaced = 0
    try:
        mask = attention_mask
        decoders = [_Decoder(m, input_ids, mask) for m in models]
        for decoder in decoders:
            if vocab_size is not None and vocab_size > decoder.logits.shape[-1]:
                raise ValueError(f"vocab_size={vocab_size} is over the model's {decoder.logits.shape[-1]} output "
                                 "logits")
        generated, alive_columns = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = decoders[0].logits[:, :vocab_size]
            token = next_tokens(logits, temperature=temperature, top_p=top_p, greedy=greedy,
                                generator=generator).to(device)
            alive = ~finished  # this step's token counts for rows that had not stopped before it
            if filter_model is not None:
                student_logits = decoders[1].logits[:, :vocab_size].float()
                proposed = torch.softmax(student_logits, -1).gather(-1, token[:, None]).squeeze(-1)
                low = alive & (proposed < filter_threshold)
                if bool(low.any()):
                    own = next_tokens(student_logits, temperature=temperature, top_p=top_p, greedy=greedy,
                                      generator=generator).to(device)
                    token = torch.where(low, own, token)
                    replaced += int(low.sum())
            token = token.masked_fill(finished, pad_token_id)
            generated.append(token)
            alive_columns.append(alive)
            if eos_token_id is not None:
                finished = finished | (alive & (token == eos_token_id))
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)
            for decoder in decoders:
                decoder.feed(token, mask)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

    completion = torch.stack(alive_columns, dim=1)
    sequences = torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
    full_mask = torch.cat([attention_mask, completion.long()], dim=1)
    completion_mask = torch.cat([torch.zeros_like(attention_mask, dtype=torch.bool), completion], dim=1)
    return Generation(sequences=sequences, attention_mask=full_mask, completion_mask=completion_mask,
                      prompt_length=width, new_tokens=int(completion.sum()), seconds=time.perf_counter() - started,
                      replaced=replaced)
