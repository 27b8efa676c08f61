"""Distillation objectives; see `distill.losses.logits` for the formulas and the shared conventions.

`logits` is imported first: it registers the divergences of `family` at its end (one REGISTRY dict).
"""
from __future__ import annotations

from distill.losses.logits import (
    ALIASES,
    FORMULAS,
    IGNORE_INDEX,
    NOT_TOKEN_SEPARABLE,
    PAPERS,
    REGISTRY,
    TaidSchedule,
    ab_divergence,
    adaptive_kl,
    cross_entropy,
    forward_kl,
    get_loss,
    jsd,
    loss_parameters,
    masked_mean,
    reverse_kl,
    select_tokens,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    student_entropy,
    taid,
    tvd,
)

__all__ = [
    "ALIASES", "FORMULAS", "IGNORE_INDEX", "NOT_TOKEN_SEPARABLE", "PAPERS", "REGISTRY", "TaidSchedule",
    "ab_divergence", "adaptive_kl", "cross_entropy", "forward_kl", "get_loss", "jsd", "loss_parameters",
    "masked_mean", "reverse_kl", "select_tokens", "sinkhorn", "skew_kl", "skew_reverse_kl", "student_entropy",
    "taid", "tvd",
]
