"""Logit-level distillation objectives: divergences between teacher and student token distributions.

Every divergence has the same signature and reduction, so the trainer can pick one by name:

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_valid_tokens=None, **params)

- logits are [..., V]; mask is [...] (True = the token counts) or None (every token counts);
- both logits are divided by `temperature`, with no T^2 factor (the GKD / TRL convention);
- the divergence is summed over the vocabulary per token, then averaged over valid tokens:
  sum(per_token) / num_valid, where num_valid is the number of valid tokens, or `num_valid_tokens`
  when given (under gradient accumulation: the total over all micro-batches);
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "ALIASES", "FORMULAS", "IGNORE_INDEX", "PAPERS", "REGISTRY",
    "cross_entropy", "forward_kl", "get_loss", "jsd", "loss_parameters", "masked_mean",
    "reverse_kl", "skew_kl", "skew_reverse_kl", "tvd",
]

IGNORE_INDEX = -100
_COMMON_PARAMETERS = frozenset({"student_logits", "teacher_logits", "mask", "temperature", "num_valid_tokens"})


# ---------------------------------------------------------------------------------------------
# Shared plumbing: validation, token selection, log-probabilities, reduction
# ---------------------------------------------------------------------------------------------

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


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype losses compute in: float32 at least, promoted with every input's (float64 stays float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, temperature: float) -> None:
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


def _check_weight(name: str, value: float, *, allow_one: bool) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _valid_rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten to [tokens, V] and keep only valid tokens.

    Masked-out positions never enter the computation, so whatever their logits hold (padding
    garbage, all -inf rows) they cannot put NaN in the value or the gradient, and cost nothing.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def _floored(logprobs: Tensor) -> Tensor:
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


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None,
               temperature: float) -> tuple[Tensor, Tensor]:
    """Validate, keep valid tokens, upcast, apply temperature: (student_logprobs, teacher_logprobs), [tokens, V]."""
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    compute_dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                                        torch.float32)

    def logprobs(logits: Tensor) -> Tensor:
        scaled = _valid_rows(logits, mask).to(compute_dtype)
        scaled = scaled / temperature if temperature != 1.0 else scaled
        return _floored(torch.log_softmax(scaled, dim=-1))

    return logprobs(student_logits), logprobs(teacher_logits)


def _kl_per_token(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) per token: sum_v p(v) (log p(v) - log q(v)), both given as finite log-probs."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(dim=-1)


def _log_mixture(a_logprobs: Tensor, b_logprobs: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed from log-probs so small probabilities survive."""
    if weight_a == 0.0:
        return b_logprobs
    if weight_a == 1.0:
        return a_logprobs
    # logaddexp: one elementwise op, no stacked copy (the stack + logsumexp cost ~2x here).
    return torch.logaddexp(a_logprobs + math.log(weight_a), b_logprobs + math.log1p(-weight_a))


# ---------------------------------------------------------------------------------------------
# The divergences
# ---------------------------------------------------------------------------------------------

def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Forward KL, mode-covering: KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)).

    Source: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network";
    GKD's generalized JSD with beta = 0. No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    return masked_mean(_kl_per_token(teacher_logprobs, student_logprobs), None, num_valid_tokens)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Reverse KL, mode-seeking: KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)).

    Source: Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models";
    GKD's generalized JSD with beta = 1. No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    return masked_mean(_kl_per_token(student_logprobs, teacher_logprobs), None, num_valid_tokens)


def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence, GKD convention.

    JSD(beta) = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M), with M = beta * p_T + (1 - beta) * p_S.
    As in GKD / TRL's GKDTrainer, the endpoints are special cases rather than limits: beta = 0 is
    exactly KL(p_T || p_S) (forward_kl) and beta = 1 exactly KL(p_S || p_T) (reverse_kl).

    Source: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD). Parameter: beta in [0, 1], default 0.5 (symmetric JSD).
    """
    beta = _check_weight("beta", beta, allow_one=True)
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    if beta == 0.0:
        per_token = _kl_per_token(teacher_logprobs, student_logprobs)
    elif beta == 1.0:
        per_token = _kl_per_token(student_logprobs, teacher_logprobs)
    else:
        mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, beta)
        per_token = (beta * _kl_per_token(teacher_logprobs, mixture_logprobs)
                     + (1.0 - beta) * _kl_per_token(student_logprobs, mixture_logprobs))
    return masked_mean(per_token, None, num_valid_tokens)


def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Total variation distance: TVD(p_T, p_S) = 0.5 * sum_v |p_T(v) - p_S(v)|, bounded in [0, 1].

    Source: Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
    No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    per_token = 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(dim=-1)
    return masked_mean(per_token, None, num_valid_tokens)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
            temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None, alpha: float = 0.1) -> Tensor:
    """Skew forward KL: KL(p_T || alpha * p_T + (1 - alpha) * p_S).

    Mixing a little teacher into the student keeps the log ratio bounded (by -log alpha), which
    stabilises gradients early in training. alpha = 0 is forward_kl.
    Source: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models".
    Parameter: alpha in [0, 1), default 0.1.
    """
    alpha = _check_weight("alpha", alpha, allow_one=False)
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, alpha)
    return masked_mean(_kl_per_token(teacher_logprobs, mixture_logprobs), None, num_valid_tokens)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None,
                    alpha: float = 0.1) -> Tensor:
    """Skew reverse KL: KL(p_S || alpha * p_S + (1 - alpha) * p_T).

    alpha = 0 is reverse_kl.
    Source: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models".
    Parameter: alpha in [0, 1), default 0.1.
    """
    alpha = _check_weight("alpha", alpha, allow_one=False)
    student_logprobs, teacher_logprobs = _log_probs(student_logits, teacher_logits, mask, temperature)
    mixture_logprobs = _log_mixture(student_logprobs, teacher_logprobs, alpha)
    return masked_mean(_kl_per_token(student_logprobs, mixture_logprobs), None, num_valid_tokens)


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                  num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy: -log p_S(label), averaged over valid tokens like the divergences.

    A token is valid when its label is not IGNORE_INDEX (-100) and, if given, its mask is True.
    No temperature: this is the ground-truth term the trainer mixes in with its own weight, so it is
    not in REGISTRY. Labels must already be aligned with the logits (no shifting happens here).
    """
    if student_logits.dim() < 1 or labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be the logits shape without the "
                         f"vocabulary dimension, {tuple(student_logits.shape[:-1])}")
    valid = labels != IGNORE_INDEX
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from labels shape {tuple(labels.shape)}")
        valid = valid & mask.bool()
    targets = labels.reshape(-1)[valid.reshape(-1)]
    vocab = student_logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}, got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logprobs = torch.log_softmax(_valid_rows(student_logits, valid).to(compute_dtype), dim=-1)
    per_token = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return masked_mean(per_token, None, num_valid_tokens)


# ---------------------------------------------------------------------------------------------
# Registry: look-up by name, formulas and citations for `distill losses`
# ---------------------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

ALIASES: dict[str, str] = {"kl": "forward_kl", "fkl": "forward_kl", "rkl": "reverse_kl",
                           "skl": "skew_kl", "srkl": "skew_reverse_kl"}

FORMULAS: dict[str, str] = {
    "forward_kl": "KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))",
    "reverse_kl": "KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))",
    "jsd": "beta KL(p_T || M) + (1-beta) KL(p_S || M), M = beta p_T + (1-beta) p_S; beta=0: KL(p_T||p_S), beta=1: KL(p_S||p_T)",
    "tvd": "0.5 sum_v |p_T(v) - p_S(v)|",
    "skew_kl": "KL(p_T || alpha p_T + (1-alpha) p_S)",
    "skew_reverse_kl": "KL(p_S || alpha p_S + (1-alpha) p_T)",
}

PAPERS: dict[str, str] = {
    "forward_kl": "Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
    "reverse_kl": "Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models",
    "jsd": "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
    "tvd": "Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation",
    "skew_kl": "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
    "skew_reverse_kl": "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The divergence registered under `name` or one of its ALIASES; ValueError listing the known names otherwise."""
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        aliases = ", ".join(f"{alias} -> {target}" for alias, target in ALIASES.items())
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(REGISTRY)} (aliases: {aliases})")
    return REGISTRY[key]


def loss_parameters(name: str) -> dict[str, object]:
    """The loss-specific keyword parameters of `name` with their defaults, e.g. {"beta": 0.5} for jsd, {} for forward_kl."""
    signature = inspect.signature(get_loss(name))
    return {parameter.name: parameter.default for parameter in signature.parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in _COMMON_PARAMETERS}


# ---------------------------------------------------------------------------------------------
# Further divergences (ABKD, AKL, TAID, SinKD) live in family.py; they are registered here so REGISTRY
# stays one dict however the package is imported. family.py imports the helpers above from this
# module; the package __init__ always imports this module first, so this bottom import is never circular.
# ---------------------------------------------------------------------------------------------

from distill.losses.family import (  # noqa: E402
    FAMILY_ALIASES,
    FAMILY_FORMULAS,
    FAMILY_PAPERS,
    FAMILY_REGISTRY,
    NOT_TOKEN_SEPARABLE,
    TaidSchedule,
    ab_divergence,
    adaptive_kl,
    select_tokens,
    sinkhorn,
    student_entropy,
    taid,
)

REGISTRY.update(FAMILY_REGISTRY)
ALIASES.update(FAMILY_ALIASES)
FORMULAS.update(FAMILY_FORMULAS)
PAPERS.update(FAMILY_PAPERS)
__all__ += ["NOT_TOKEN_SEPARABLE", "TaidSchedule", "ab_divergence", "adaptive_kl", "select_tokens", "sinkhorn",
            "student_entropy", "taid"]
