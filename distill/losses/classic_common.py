"""Shared pieces of the classifier logit terms (distill.losses.classic_kd, .classic_targets, .classic):
validation of [N, C] logits and [N] labels, the compute dtype, floored log-softmax, per-row KL, target columns."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.common import compute_dtype, floored
from distill.losses.registry import Param, check_number

__all__ = [
    "check_labels", "check_logits", "check_temperature", "kl_rows", "log_softmax", "non_target", "prepare", "target",
    "temperature_param",
]


def temperature_param(default: float) -> Param:
    """The `temperature` parameter of a classifier term: T > 0, finite, with that term's default."""
    return Param(default, "float", low=0, low_open=True, doc="softmax temperature T (each paper's own convention)")


def check_temperature(value: object) -> float:
    """`value` as a temperature T > 0, finite; ValueError naming `temperature` otherwise."""
    return check_number("temperature", value, 0.0, None, low_open=True,
                        fix="pass a positive temperature, e.g. 1.0 or 4.0")


def check_logits(student_logits: Tensor, teacher_logits: Tensor | None = None) -> None:
    """Both are floating-point [N, C] with N >= 1 and C >= 2, of equal shapes (teacher_logits may be None)."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits is None:
            continue
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{getattr(logits, 'dtype', type(logits).__name__)}")
        if logits.dim() != 2:
            raise ValueError(f"{name} must have shape [N, C] (one row of class logits per example), got "
                             f"{tuple(logits.shape)}: flatten extra dimensions into N first")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
                         f"{tuple(student_logits.shape)}: both must be [N, C] over the same classes")
    num_examples, num_classes = student_logits.shape
    if num_examples == 0:
        raise ValueError("student_logits has no examples (N = 0): the mean over examples is undefined")
    if num_classes < 2:
        raise ValueError(f"student_logits has {num_classes} class(es): a classifier needs C >= 2")


def check_labels(labels: Tensor | None, num_examples: int, num_classes: int, *, required: bool,
                 loss_name: str) -> Tensor | None:
    """Labels as a LongTensor [N] of class indices in [0, C), or None when not `required`."""
    if labels is None:
        if required:
            raise ValueError(f"labels is None but {loss_name} needs the ground-truth classes: pass labels, "
                             "a LongTensor [N] of class indices")
        return None
    if (not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype is torch.bool):
        raise ValueError(f"labels must be an integer tensor of class indices, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}: use labels.long()")
    if labels.shape != (num_examples,):
        raise ValueError(f"labels must have shape [N] = ({num_examples},), got {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}) (C = {num_classes}), got values in [{low}, {high}]; "
                         "ignore-index labels such as -100 must be filtered out first")
    return labels.long()


def prepare(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, labels_required: bool,
            loss_name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate, then upcast both logits to the compute dtype: (student, teacher, labels as long or None)."""
    check_logits(student_logits, teacher_logits)
    labels = check_labels(labels, *student_logits.shape, required=labels_required, loss_name=loss_name)
    dtype = compute_dtype(student_logits, teacher_logits)
    return student_logits.to(dtype), teacher_logits.to(dtype), labels


def log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T), floored (common.floored) so a -inf logit gives a finite log-probability."""
    return floored(torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1))


def kl_rows(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) per row, from finite log-probabilities: sum_c p_c (log p_c - log q_c)."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(dim=-1)


def non_target(values: Tensor, labels: Tensor) -> Tensor:
    """The C-1 columns of `values` [N, C] other than each row's label, in class order: [N, C-1]."""
    num_examples, num_classes = values.shape
    keep = torch.arange(num_classes, device=values.device) != labels.unsqueeze(-1)
    return values[keep].view(num_examples, num_classes - 1)


def target(values: Tensor, labels: Tensor) -> Tensor:
    """Each row's value at its label: [N]."""
    return values.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
