"""Distillation objectives, all in one registry (`distill.losses.registry`): look a loss up by name and kind
with `get_spec`, list them with `specs`, check a recipe's parameters with `check_params`.

Importing the package registers every loss: each module below registers its losses where it defines them.
The order of the imports is the order of `specs()` (and of `distill losses`). See `distill.losses.logits`
for the conventions of the token divergences.
"""
from __future__ import annotations

from distill.losses.registry import (
    KINDS,
    LossParameterError,
    LossSpec,
    Param,
    check_params,
    get_spec,
    register,
    register_spec,
    specs,
)
from distill.losses.common import compute_dtype, masked_mean
from distill.losses.logits import (
    IGNORE_INDEX,
    cross_entropy,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from distill.losses.family import (
    TaidSchedule,
    ab_divergence,
    adaptive_kl,
    select_tokens,
    sinkhorn,
    student_entropy,
    taid,
)
from distill.losses import classic, ensemble, features, diffusion, cross_tokenizer, preference  # noqa: F401  (they register their losses)

__all__ = [
    "IGNORE_INDEX", "KINDS", "LossParameterError", "LossSpec", "Param", "TaidSchedule", "ab_divergence",
    "adaptive_kl", "check_params", "compute_dtype", "cross_entropy", "forward_kl", "get_spec", "jsd", "masked_mean",
    "register", "register_spec", "reverse_kl", "select_tokens", "sinkhorn", "skew_kl", "skew_reverse_kl", "specs",
    "student_entropy", "taid", "tvd",
]
