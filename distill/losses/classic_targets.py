"""Classifier terms that weight every class by the teacher's probability: PLD (a Plackett-Luce ranking of the
classes, Bassam et al. 2025) and OFA (an enhanced target, Hao et al. 2023). Conventions: see distill.losses.classic."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.classic_common import (check_logits, check_temperature, log_softmax, prepare,
                                           temperature_param)
from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register

__all__ = ["ofa_loss", "plackett_luce_loss", "pld"]


# ---------------------------------------------------------------------------------------------
# PLD (Bassam, Zhu & Bian 2025)
# ---------------------------------------------------------------------------------------------

def plackett_luce_loss(student_logits: Tensor, permutation: Tensor, weights: Tensor) -> Tensor:
    """Weighted Plackett-Luce negative log-likelihood of a fixed ranking, averaged over examples:

        sum_k w_k * [ -s_{pi_k} + log sum_{j >= k} exp(s_{pi_j}) ]

    permutation [N, C]: each row a permutation of 0..C-1, rank 0 first; weights [N, C]: w_k >= 0, the
    weight of rank k (not of class k). One-hot weights on rank 0 give the cross-entropy of class pi_0;
    uniform weights give ListMLE. (Xia et al. ICML 2008, ListMLE; weighted as in PLD, Bassam et al. 2025.)
    """
    check_logits(student_logits)
    shape = tuple(student_logits.shape)
    if not isinstance(permutation, Tensor) or permutation.is_floating_point() or permutation.dtype == torch.bool:
        raise ValueError("permutation must be an integer tensor [N, C] of class indices, got "
                         f"{getattr(permutation, 'dtype', type(permutation).__name__)}")
    if tuple(permutation.shape) != shape:
        raise ValueError(f"permutation shape {tuple(permutation.shape)} differs from student_logits shape {shape}")
    identity = torch.arange(shape[1], device=permutation.device).expand(shape)
    if not torch.equal(permutation.sort(dim=-1).values, identity):
        raise ValueError("permutation rows must each contain every class index 0..C-1 exactly once")
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or tuple(weights.shape) != shape:
        raise ValueError(f"weights must be a floating-point tensor of shape {shape} (one weight per rank), got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} {tuple(getattr(weights, 'shape', ()))}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and >= 0 (the PL surrogate is convex only for non-negative weights)")
    return _plackett_luce(student_logits.to(compute_dtype(student_logits, weights)), permutation.long(), weights)


def _plackett_luce(student: Tensor, permutation: Tensor, weights: Tensor) -> Tensor:
    ranked = student.gather(-1, permutation)
    # logsumexp over ranks j >= k: a cumulative logsumexp run from the last rank backwards.
    suffix_logsumexp = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    return (weights.to(ranked.dtype) * (suffix_logsumexp - ranked)).sum(dim=-1).mean()


@register("pld", kind="classifier", needs_labels=True,
          formula="sum_k softmax(t/T)_{pi_k} [logsumexp_{j>=k} s_{pi_j} - s_{pi_k}]; pi = (y, rest by decreasing t)",
          paper="Bassam et al. 2025, PLD: A Choice-Theoretic List-Wise Knowledge Distillation (arXiv:2506.12542)",
          params={"temperature": temperature_param(1.0)})
def pld(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        temperature: float = 1.0) -> Tensor:
    """Plackett-Luce Distillation, averaged over examples:

        sum_k q^T_{pi*_k} * [ -s_{pi*_k} + log sum_{j >= k} exp(s_{pi*_j}) ]

    pi*: the teacher-optimal permutation, the true label first, then the other classes by decreasing teacher
    logit (ties by class index). q^T = softmax(t / T): each rank is weighted by the teacher's probability of
    the class at that rank (the label's weight is q^T_label, not the teacher's top probability). The
    student's logits are not softened. One loss replaces CE + KD: no separate CE term, no mixing weight.
    Source: Bassam, Zhu & Bian 2025, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation"
    (arXiv:2506.12542), Sec. 4 and the reference implementation of its Appendix C. Parameter: temperature
    T > 0 of the teacher weights (default 1, the paper's best setting; it also reports T = 4 on CIFAR-100).
    """
    temperature = check_temperature(temperature)
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="pld")
    by_teacher = torch.sort(teacher, dim=-1, descending=True, stable=True).indices
    others = by_teacher[by_teacher != labels.unsqueeze(-1)].view(teacher.shape[0], teacher.shape[1] - 1)
    permutation = torch.cat([labels.unsqueeze(-1), others], dim=-1)
    weights = torch.softmax(teacher / temperature, dim=-1).gather(-1, permutation)
    return _plackett_luce(student, permutation, weights)


# ---------------------------------------------------------------------------------------------
# OFA (Hao et al. NeurIPS 2023)
# ---------------------------------------------------------------------------------------------

@register("ofa", kind="classifier", needs_labels=True,
          formula="-sum_c [(p^T_c + 1[c=y])^eps - 1[c=y]] log p^S_c, p = softmax(./T)",
          paper="Hao et al. NeurIPS 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in "
                "Knowledge Distillation",
          params={"temperature": temperature_param(1.0),
                  "eps": Param(1.0, "float", low=0, low_open=True, doc="OFA's modulating exponent; > 1 enhances "
                                                                       "the target")})
def ofa_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
             temperature: float = 1.0, eps: float = 1.0) -> Tensor:
    """OFA adaptive target enhancement: -sum_c [(p^T_c + 1[c = y])^eps - 1[c = y]] log p^S_c, mean over examples.

    p = softmax(logits / T) for both models, no T^2. Target class: weight (1 + p^T_y)^eps - 1; non-target
    class c: (p^T_c)^eps. Adding the usual CE term (weight 1) makes the target weight (1 + p^T_y)^eps, the
    paper's enhanced target term: the less confident the teacher, the less the target is enhanced.
    eps = 1 is the cross-entropy against the teacher's soft labels, H(p^T, p^S), whatever the labels.
    Source: Hao et al. NeurIPS 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
    Knowledge Distillation"; formula of the official code (Hao840/OFAKD, distillers/ofa.py), which also
    raises the non-target teacher probabilities to eps. Parameters: temperature T > 0 (default 1),
    eps > 0 (default 1; the paper's modulating parameter, > 1 to enhance the target).
    """
    temperature = check_temperature(temperature)
    eps = check_number("eps", eps, 0.0, None, low_open=True, fix="eps is OFA's modulating exponent, e.g. 1.0 to 1.5")
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="ofa_loss")
    target_mask = torch.nn.functional.one_hot(labels, student.shape[-1]).to(student.dtype)
    teacher_probs = log_softmax(teacher, temperature).exp()
    class_weights = (teacher_probs + target_mask) ** eps - target_mask
    return -(class_weights * log_softmax(student, temperature)).sum(dim=-1).mean()
