"""Closed-form value and logit gradient of one chunk, computed in place in reused buffers.

The fused loss (`distill/losses/fused.py`) needs, per chunk of tokens, the loss value and
d loss / d student_logits. Autograd gets there through saved intermediates: ~10 full-vocabulary
tensors per token, each freshly allocated (page faults cost as much as the arithmetic on this
machine). For the common objectives the gradient has a closed form, and everything fits in 3-5
[chunk, V] buffers that live for the whole loss call. Fewer copies per token means larger chunks
in the same memory budget, and larger chunks make the chunk matmuls ~1.5x faster on CPU.

With s = z_S / T and t = z_T / T (per token), p_S = softmax(s), p_T = softmax(t), N the number
of valid tokens, the gradients with respect to the student logits z_S are:
- forward KL(p_T || p_S):   (p_S - p_T) / (T N)
- reverse KL(p_S || p_T):   p_S (log p_S - log p_T - KL(p_S || p_T)) / (T N)
- JSD(beta), M = beta p_T + (1 - beta) p_S:
                            (1 - beta) p_S (log(p_S / M) - KL(p_S || M)) / (T N)
  (d JSD / d p_S = (1 - beta) log(p_S / M): the other terms cancel since sum M = 1)
- CE at temperature 1:      (softmax(z_S) - onehot(label)) / N
Teacher log-probabilities are floored at log(smallest normal float), as in `logits.py`, so a
sparse (top-k) teacher's zeros give finite values.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from distill.losses.logits import forward_kl, jsd, reverse_kl

# value terms (unweighted sums over the chunk's tokens, to be divided by N) and the buffer
# holding the weighted gradient
ChunkResult = tuple[dict[str, Tensor], Tensor]


def _log_softmax_(logits: Tensor, probs_out: Tensor) -> None:
    """logits <- log_softmax(logits) and probs_out <- softmax(logits), in place, no temporaries."""
    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=probs_out)
    totals = probs_out.sum(-1, keepdim=True)
    probs_out.div_(totals)
    logits.sub_(totals.log_())


def _row_sum_of_product(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """Per-row sum(a * b), [n], with the product in `out` (may be `b`). torch's sum adds in a
    cascade; a BLAS dot (no buffer) adds sequentially and lost ~2e-5 of a KL's value in float32."""
    return torch.mul(a, b, out=out).sum(-1)


def _floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny)


def _label_logprob_sum(logprobs: Tensor, labels: Tensor) -> Tensor:
    return logprobs.gather(-1, labels[:, None]).sum(dtype=torch.float64)


def _subtract_onehot_(grad: Tensor, labels: Tensor, scale: float) -> None:
    grad.scatter_add_(-1, labels[:, None], torch.full((labels.shape[0], 1), -scale, dtype=grad.dtype,
                                                     device=grad.device))


def _add_cross_entropy_(grad: Tensor, student_probs: Tensor, labels: Tensor, scale: float) -> None:
    """grad += scale * (p_S - onehot(label)), p_S at temperature 1."""
    grad.add_(student_probs, alpha=scale)
    _subtract_onehot_(grad, labels, scale)


def forward_kl_chunk(student: Tensor, teacher: Tensor | None, spare: Tensor, labels: Tensor, count: float,
                     kd_weight: float, ce_weight: float, temperature: float) -> ChunkResult:
    """kd_weight * KL(p_T || p_S) + ce_weight * CE, any temperature; 3 buffers.

    student and teacher hold raw logits and are overwritten; the gradient ends in `teacher`'s
    buffer (in `spare` when there is no teacher, i.e. CE alone)."""
    terms: dict[str, Tensor] = {}
    if kd_weight == 0:
        _log_softmax_(student, spare)
        terms["ce"] = -_label_logprob_sum(student, labels)
        spare.mul_(ce_weight / count)
        _subtract_onehot_(spare, labels, ce_weight / count)
        return terms, spare
    if temperature != 1.0:
        student.div_(temperature)
        teacher.div_(temperature)
    _log_softmax_(student, spare)  # student = log p_S
    _log_softmax_(teacher, spare)  # teacher = log p_T, spare = p_T
    teacher.clamp_(min=_floor(teacher.dtype)).sub_(student)  # log p_T - log p_S
    terms["kd"] = _row_sum_of_product(spare, teacher, out=teacher).sum(dtype=torch.float64)
    grad = torch.exp(student, out=teacher)  # p_S
    kd_scale = kd_weight / (temperature * count)
    if ce_weight > 0 and temperature == 1.0:  # softmax(z_S) is p_S itself
        terms["ce"] = -_label_logprob_sum(student, labels)
        ce_scale = ce_weight / count
        grad.mul_(kd_scale + ce_scale).sub_(spare, alpha=kd_scale)
        _subtract_onehot_(grad, labels, ce_scale)
        return terms, grad
    grad.sub_(spare).mul_(kd_scale)
    if ce_weight > 0:  # CE needs softmax(z_S) at T = 1: T * log p_S = z_S + const per row
        student.mul_(temperature)
        _log_softmax_(student, spare)
        terms["ce"] = -_label_logprob_sum(student, labels)
        _add_cross_entropy_(grad, spare, labels, ce_weight / count)
    return terms, grad


def reverse_kl_chunk(student: Tensor, teacher: Tensor, spare: Tensor, labels: Tensor, count: float,
                     kd_weight: float, ce_weight: float, temperature: float) -> ChunkResult:
    """kd_weight * KL(p_S || p_T) + ce_weight * CE (CE only at temperature 1); 3 buffers.
    The gradient ends in `student`'s buffer."""
    if temperature != 1.0:
        student.div_(temperature)
        teacher.div_(temperature)
    _log_softmax_(teacher, spare)
    teacher.clamp_(min=_floor(teacher.dtype))  # log p_T, floored
    _log_softmax_(student, spare)  # student = log p_S, spare = p_S
    terms: dict[str, Tensor] = {}
    if ce_weight > 0:
        terms["ce"] = -_label_logprob_sum(student, labels)
    student.sub_(teacher)  # log(p_S / p_T)
    per_token = _row_sum_of_product(spare, student, out=teacher)
    terms["kd"] = per_token.sum(dtype=torch.float64)
    grad = student.sub_(per_token[:, None]).mul_(spare).mul_(kd_weight / (temperature * count))
    if ce_weight > 0:
        _add_cross_entropy_(grad, spare, labels, ce_weight / count)
    return terms, grad


def jsd_chunk(student: Tensor, teacher: Tensor, spare: Tensor, teacher_probs: Tensor, mixture_log: Tensor,
              labels: Tensor, count: float, kd_weight: float, ce_weight: float, temperature: float,
              beta: float) -> ChunkResult:
    """kd_weight * JSD(beta) + ce_weight * CE (CE only at temperature 1), 0 < beta < 1; 5 buffers.
    The gradient ends in `student`'s buffer."""
    if temperature != 1.0:
        student.div_(temperature)
        teacher.div_(temperature)
    _log_softmax_(teacher, teacher_probs)
    teacher.clamp_(min=_floor(teacher.dtype))  # log p_T, floored
    _log_softmax_(student, spare)  # student = log p_S, spare = p_S
    terms: dict[str, Tensor] = {}
    if ce_weight > 0:
        terms["ce"] = -_label_logprob_sum(student, labels)
    torch.add(teacher_probs, spare, alpha=(1.0 - beta) / beta, out=mixture_log).mul_(beta)  # M
    mixture_log.clamp_(min=torch.finfo(mixture_log.dtype).tiny).log_()
    teacher.sub_(mixture_log)  # log(p_T / M)
    teacher_to_mixture = _row_sum_of_product(teacher_probs, teacher, out=teacher)  # KL(p_T || M) per token
    student.sub_(mixture_log)  # log(p_S / M)
    student_to_mixture = _row_sum_of_product(spare, student, out=teacher)  # KL(p_S || M) per token
    terms["kd"] = (beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture).sum(dtype=torch.float64)
    scale = (1.0 - beta) * kd_weight / (temperature * count)
    grad = student.sub_(student_to_mixture[:, None]).mul_(spare).mul_(scale)
    if ce_weight > 0:
        _add_cross_entropy_(grad, spare, labels, ce_weight / count)
    return terms, grad


def closed_form_for(divergence: Callable | None, params: dict, kd_weight: float, ce_weight: float,
                    temperature: float) -> tuple[Callable, int] | None:
    """(chunk function taking the buffers, number of [chunk, V] buffers) when the objective has a
    closed form here, else None (the fused loss then runs autograd per chunk).

    The chunk function is called as fn(buffers, labels, count) -> (terms, grad); buffers[0] holds
    the student's raw logits and buffers[1] the teacher's."""
    kd = divergence is not None and kd_weight > 0
    if not kd:
        return (lambda b, labels, count: forward_kl_chunk(b[0], None, b[1], labels, count, 0.0, ce_weight,
                                                          temperature)), 2
    beta = float(params.get("beta", 0.5)) if divergence is jsd else None
    if set(params) - ({"beta"} if divergence is jsd else set()):
        return None
    if divergence is forward_kl or beta == 0.0:
        return (lambda b, labels, count: forward_kl_chunk(b[0], b[1], b[2], labels, count, kd_weight, ce_weight,
                                                          temperature)), 3
    if ce_weight > 0 and temperature != 1.0:
        return None  # CE would need softmax at T = 1 beside p_S at T: the generic path
    if divergence is reverse_kl or beta == 1.0:
        return (lambda b, labels, count: reverse_kl_chunk(b[0], b[1], b[2], labels, count, kd_weight, ce_weight,
                                                          temperature)), 3
    if divergence is jsd and 0.0 < beta < 1.0:
        return (lambda b, labels, count: jsd_chunk(b[0], b[1], b[2], b[3], b[4], labels, count, kd_weight,
                                                   ce_weight, temperature, beta)), 5
    return None
