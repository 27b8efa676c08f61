"""Distillation objectives; see `distill.losses.logits` for the formulas and the shared conventions."""
from __future__ import annotations

from distill.losses.logits import (
    ALIASES,
    FORMULAS,
    IGNORE_INDEX,
    PAPERS,
    REGISTRY,
    cross_entropy,
    forward_kl,
    get_loss,
    jsd,
    loss_parameters,
    masked_mean,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)

__all__ = [
    "ALIASES", "FORMULAS", "IGNORE_INDEX", "PAPERS", "REGISTRY",
    "cross_entropy", "forward_kl", "get_loss", "jsd", "loss_parameters", "masked_mean",
    "reverse_kl", "skew_kl", "skew_reverse_kl", "tvd",
]
