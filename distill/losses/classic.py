"""Classifier distillation objectives: KD, DKD, NKD (classic_kd.py), PLD, OFA (classic_targets.py), logit
standardisation, and the hard-label cross-entropy term `ce` (here).

Every term has the same signature and reduction, so a recipe can pick one by name:

    fn(student_logits [N, C], teacher_logits [N, C] | None, labels [N] | None, *, temperature=..., **params) -> scalar

- logits are one row per example; labels are class indices in [0, C) (None only where a loss needs none);
- the value is the mean over the N examples;
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64;
- unlike the LM divergences in `logits.py`, the temperature conventions are each paper's own (KD and DKD
  multiply by T^2, NKD's non-target term too, PLD softens only the teacher's weights, OFA has no T^2).

Gradients flow to both logits; a trainer passes teacher logits computed under no_grad. Every term registers
itself (kind "classifier") in distill.losses.registry; BD-KD (`bdkd`, distill.losses.ensemble) is one too.
"""
from __future__ import annotations

from torch import Tensor

from distill.losses.classic_common import check_labels, check_logits, log_softmax, target
from distill.losses.classic_kd import (dkd, dkd_warmup, hinton_kd, kd_decomposition, nckd, nkd, standardize_logits,
                                       tckd)
from distill.losses.classic_targets import ofa_loss, plackett_luce_loss, pld
from distill.losses.common import compute_dtype
from distill.losses.registry import register

__all__ = [
    "dkd", "dkd_warmup", "hinton_kd", "kd_decomposition", "label_cross_entropy", "nckd", "nkd", "ofa_loss",
    "plackett_luce_loss", "pld", "standardize_logits", "tckd",
]


@register("ce", kind="classifier", needs_labels=True, needs_teacher=False,
          formula="-log softmax(s)_y, mean over examples (no teacher)",
          paper="the maximum-likelihood (hard-label) term of supervised training; Hinton et al. 2015 mix it with KD")
def label_cross_entropy(student_logits: Tensor, teacher_logits: Tensor | None = None,
                        labels: Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy: CE(s, y) = -log softmax(s)_y, averaged over the N examples.

    The ground-truth term of a classifier objective; it uses no teacher (teacher_logits is ignored and may be
    None). Equal to F.cross_entropy(student_logits, labels) (computed in float32 at least; a -inf logit at the
    label gives a large finite value instead of inf). No parameters.
    """
    check_logits(student_logits)
    labels = check_labels(labels, *student_logits.shape, required=True, loss_name="ce")
    student = student_logits.to(compute_dtype(student_logits))
    return -target(log_softmax(student), labels).mean()
