"""Shared plumbing of the loss modules: compute dtype, validation, token selection, log-probabilities, reduction.

The conventions of the token divergences (see `distill.losses.logits`) live here, so every module that
computes them (logits, family, and the classifier terms that reuse the floor) imports one implementation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_inputs", "compute_dtype", "floored", "kl_per_token", "log_probs", "masked_mean", "valid_rows"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype losses compute in: float32 at least, promoted with every input's (float64 stays float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def masked_mean(per_token: Tensor, mask: Tensor | None = None,
                num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Average per-token values over valid tokens: sum(per_token where mask) / num_valid.

    num_valid is mask.sum() (or per_token.numel() without a mask), clamped to >= 1 so an all-masked
    batch gives 0 rather than NaN. Pass `num_valid_tokens` to divide by a count taken over a larger
    batch instead (gradient accumulation: the valid tokens of all micro-batches).
    """
    if mask is not None:
        if mask.shape != per_token.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from per-token shape {tuple(per_token.shape)}")
        mask = mask.bool()
        # where, not multiplication: 0 * inf at a masked-out token would be NaN
        per_token = torch.where(mask, per_token, 0.0)
        count: int | Tensor = mask.sum()
    else:
        count = per_token.numel()
    total = per_token.sum()
    denominator = count if num_valid_tokens is None else num_valid_tokens
    return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device).clamp(min=1)


def check_inputs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, temperature: float) -> None:
    """Token-divergence inputs: logits [..., V] of equal shapes, mask [...] or None, temperature > 0."""
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: expected shape [..., V]")
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_vocab != teacher_vocab:
        raise ValueError(f"student_logits has vocabulary {student_vocab} but teacher_logits {teacher_vocab}: "
                         "slice both to the tokenizer's vocabulary first")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} differs from "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the logits shape without the vocabulary "
                         f"dimension, {tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def valid_rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten to [tokens, V] and keep only valid tokens.

    Masked-out positions never enter the computation, so whatever their logits hold (padding
    garbage, all -inf rows) they cannot put NaN in the value or the gradient, and cost nothing.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def floored(logprobs: Tensor) -> Tensor:
    """Raise log-probabilities below log(smallest normal float) to that floor; gradient passes straight through.

    A zero probability (a -inf logit, e.g. a masked vocabulary entry) gives log p = -inf, and then
    p * (log p - log q) or log p - log q is inf or NaN, in the value or in the backward pass. Treating
    p < tiny (1e-38 in float32) as tiny keeps every quantity finite and changes no realistic value
    (reverse KL against a teacher zero becomes a large finite penalty instead of inf). The gradient
    of the floored entries is the unfloored one (where finite), so a confidently wrong student is
    still corrected.
    """
    info = torch.finfo(logprobs.dtype)
    # The common case has nothing below the floor: one reduction instead of five full-size ops
    # (and their backward) on a [tokens, vocabulary] tensor.
    if logprobs.numel() == 0 or bool(logprobs.min() > math.log(info.tiny)):
        return logprobs
    finite = logprobs.clamp(min=info.min)
    straight_through = math.log(info.tiny) + (finite - finite.detach())
    return torch.where(finite > math.log(info.tiny), finite, straight_through)


def log_probs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None,
              temperature: float) -> tuple[Tensor, Tensor]:
    """Validate, keep valid tokens, upcast, apply temperature: (student_logprobs, teacher_logprobs), [tokens, V]."""
    check_inputs(student_logits, teacher_logits, mask, temperature)
    dtype = compute_dtype(student_logits, teacher_logits)

    def logprobs(logits: Tensor) -> Tensor:
        scaled = valid_rows(logits, mask).to(dtype)
        scaled = scaled / temperature if temperature != 1.0 else scaled
        return floored(torch.log_softmax(scaled, dim=-1))

    return logprobs(student_logits), logprobs(teacher_logits)


def kl_per_token(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) per token: sum_v p(v) (log p(v) - log q(v)), both given as finite log-probs."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(dim=-1)
