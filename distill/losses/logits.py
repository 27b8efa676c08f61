"""Logit-level distillation objectives: divergences between teacher and student token distributions.

Every divergence has the same signature and reduction, and registers itself (kind "token") in the one loss
registry (distill.losses.registry), so the trainer can pick one by name; more of them live in family.py:

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_valid_tokens=None, **params)

- logits are [..., V]; mask is [...] (True = the token counts) or None (every token counts);
- both logits are divided by `temperature`, with no T^2 factor (the GKD / TRL convention);
- the divergence is summed over the vocabulary per token, then averaged over valid tokens:
  sum(per_token) / num_valid, where num_valid is the number of valid tokens, or `num_valid_tokens`
  when given (under gradient accumulation: the total over all micro-batches);
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.common import compute_dtype, kl_per_token, log_probs, masked_mean, valid_rows
from distill.losses.registry import Param, check_number, register

__all__ = [
    "IGNORE_INDEX", "cross_entropy", "forward_kl", "jsd", "masked_mean", "reverse_kl", "skew_kl", "skew_reverse_kl",
    "tvd",
]

IGNORE_INDEX = -100

# The skew divergences' mixing weight: alpha = 1 would compare a distribution with itself.
_SKEW_ALPHA = Param(0.1, "float", low=0, high=1, high_open=True,
                    doc="weight of the first distribution in the mixture; 0 is the plain KL")
_DISTILLM = "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models"


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

@register("forward_kl", kind="token", aliases=("kl", "fkl"),
          formula="KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))",
          paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Forward KL, mode-covering: KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)).

    Source: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network";
    GKD's generalized JSD with beta = 0. No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    return masked_mean(kl_per_token(teacher_logprobs, student_logprobs), None, num_valid_tokens)


@register("reverse_kl", kind="token", aliases=("rkl",),
          formula="KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))",
          paper="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Reverse KL, mode-seeking: KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)).

    Source: Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models";
    GKD's generalized JSD with beta = 1. No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    return masked_mean(kl_per_token(student_logprobs, teacher_logprobs), None, num_valid_tokens)


@register("jsd", kind="token",
          formula="beta KL(p_T || M) + (1-beta) KL(p_S || M), M = beta p_T + (1-beta) p_S; "
                  "beta=0: KL(p_T||p_S), beta=1: KL(p_S||p_T)",
          paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
          params={"beta": Param(0.5, "float", low=0, high=1, doc="weight of the teacher in the mixture M; "
                                                                "0 is forward KL, 1 reverse KL")})
def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence, GKD convention.

    JSD(beta) = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M), with M = beta * p_T + (1 - beta) * p_S.
    As in GKD / TRL's GKDTrainer, the endpoints are special cases rather than limits: beta = 0 is
    exactly KL(p_T || p_S) (forward_kl) and beta = 1 exactly KL(p_S || p_T) (reverse_kl).

    Source: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD). Parameter: beta in [0, 1], default 0.5 (symmetric JSD).
    """
    beta = check_number("beta", beta, 0.0, 1.0)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    if beta == 0.0:
        per_token = kl_per_token(teacher_logprobs, student_logprobs)
    elif beta == 1.0:
        per_token = kl_per_token(student_logprobs, teacher_logprobs)
    else:
        mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, beta)
        per_token = (beta * kl_per_token(teacher_logprobs, mixture_logprobs)
                     + (1.0 - beta) * kl_per_token(student_logprobs, mixture_logprobs))
    return masked_mean(per_token, None, num_valid_tokens)


@register("tvd", kind="token", formula="0.5 sum_v |p_T(v) - p_S(v)|",
          paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation")
def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Total variation distance: TVD(p_T, p_S) = 0.5 * sum_v |p_T(v) - p_S(v)|, bounded in [0, 1].

    Source: Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
    No loss-specific parameters.
    """
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    per_token = 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(dim=-1)
    return masked_mean(per_token, None, num_valid_tokens)


@register("skew_kl", kind="token", aliases=("skl",), formula="KL(p_T || alpha p_T + (1-alpha) p_S)",
          paper=_DISTILLM, params={"alpha": _SKEW_ALPHA})
def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
            temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None, alpha: float = 0.1) -> Tensor:
    """Skew forward KL: KL(p_T || alpha * p_T + (1 - alpha) * p_S).

    Mixing a little teacher into the student keeps the log ratio bounded (by -log alpha), which
    stabilises gradients early in training. alpha = 0 is forward_kl.
    Source: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models".
    Parameter: alpha in [0, 1), default 0.1.
    """
    alpha = check_number("alpha", alpha, 0.0, 1.0, high_open=True)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, alpha)
    return masked_mean(kl_per_token(teacher_logprobs, mixture_logprobs), None, num_valid_tokens)


@register("skew_reverse_kl", kind="token", aliases=("srkl",), formula="KL(p_S || alpha p_S + (1-alpha) p_T)",
          paper=_DISTILLM, params={"alpha": _SKEW_ALPHA})
def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None,
                    alpha: float = 0.1) -> Tensor:
    """Skew reverse KL: KL(p_S || alpha * p_S + (1 - alpha) * p_T).

    alpha = 0 is reverse_kl.
    Source: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models".
    Parameter: alpha in [0, 1), default 0.1.
    """
    alpha = check_number("alpha", alpha, 0.0, 1.0, high_open=True)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    mixture_logprobs = _log_mixture(student_logprobs, teacher_logprobs, alpha)
    return masked_mean(kl_per_token(student_logprobs, mixture_logprobs), None, num_valid_tokens)


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                  num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy: -log p_S(label), averaged over valid tokens like the divergences.

    A token is valid when its label is not IGNORE_INDEX (-100) and, if given, its mask is True.
    No temperature: this is the ground-truth term the trainer mixes in with its own weight, so it is
    not a registered token divergence. Labels must already be aligned with the logits (no shifting here).
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
    logprobs = torch.log_softmax(valid_rows(student_logits, valid).to(compute_dtype(student_logits)), dim=-1)
    per_token = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return masked_mean(per_token, None, num_valid_tokens)
