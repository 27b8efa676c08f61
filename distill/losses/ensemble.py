"""Signals from several models: teachers combined into one target (multi-teacher KD), and the
balanced divergence of online (mutual) distillation between two models that train together."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.classic_common import check_temperature, temperature_param
from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register


@register("bdkd", kind="classifier",
          formula="T^2 (a_i KL(p_T||p_S) + b_i KL(p_S||p_T)), "
                  "(a, b) = (1, gamma) if H(p_S) > H(p_T) else (gamma, 1)",
          paper="Amara et al. 2022, BD-KD: Balancing the Divergences for Online Knowledge Distillation",
          params={"temperature": temperature_param(1.0),
                  "gamma": Param(2.0, "float", low=1, doc="the heavier weight, on the KL that corrects the sample's "
                                                          "confidence; 1 is the symmetric sum")})
def balanced_divergence(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                        temperature: float = 1.0, gamma: float = 2.0) -> Tensor:
    """BD-KD's sample-wise balance of forward and reverse KL (Amara et al. 2022, "BD-KD: Balancing the
    Divergences for Online Knowledge Distillation"):

        loss_i = T^2 * (a_i * KL(p_T,i || p_S,i) + b_i * KL(p_S,i || p_T,i)),
        (a_i, b_i) = (1, gamma) if H(p_S,i) > H(p_T,i) else (gamma, 1),

    with p = softmax(logits / T), averaged over the batch. A student less confident than its teacher on a
    sample gets more of the mode-seeking reverse KL (it sharpens), a more confident one more of the
    mass-covering forward KL (it softens): the paper's aim is calibration. gamma = 1 is the symmetric sum
    of both KLs. The teacher logits are used as given (detach them for a one-way signal). `labels` is not
    used (BD-KD needs none): it is there so that every classifier term has the same signature.
    Parameters: temperature T > 0 (default 1); gamma >= 1 (default 2), both finite.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [N, C]")
    temperature = check_temperature(temperature)
    gamma = check_number("gamma", gamma, 1.0, None, fix="gamma is the heavier weight, >= 1")
    dtype = compute_dtype(student_logits)
    student_logprobs = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student_probs, teacher_probs = student_logprobs.exp(), teacher_logprobs.exp()
    forward = (teacher_probs * (teacher_logprobs - student_logprobs)).sum(-1)
    reverse = (student_probs * (student_logprobs - teacher_logprobs)).sum(-1)
    with torch.no_grad():  # the weights are a choice per sample, not something to differentiate
        less_confident = -(student_probs * student_logprobs).sum(-1) > -(teacher_probs * teacher_logprobs).sum(-1)
        forward_weight = torch.where(less_confident, 1.0, gamma).to(dtype)
        reverse_weight = torch.where(less_confident, gamma, 1.0).to(dtype)
    return temperature ** 2 * (forward_weight * forward + reverse_weight * reverse).mean()


def _mean_entropy(logits: Tensor, temperature: float) -> float:
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return float(-(logprobs.exp() * logprobs).sum(-1).mean())


def balancing_temperature(logits: Tensor, target_entropy: float, *, low: float = 0.05, high: float = 50.0,
                          iterations: int = 40) -> float:
    """The temperature T at which softmax(logits / T) has mean entropy `target_entropy` (bisection on log T;
    the entropy rises with T). Clamped to [low, high] when the target is out of reach."""
    log_low, log_high = math.log(low), math.log(high)
    for _ in range(iterations):
        middle = (log_low + log_high) / 2
        if _mean_entropy(logits, math.exp(middle)) < target_entropy:
            log_low = middle
        else:
            log_high = middle
    return math.exp((log_low + log_high) / 2)


@torch.no_grad()
def combine_teachers(teacher_logits: list[Tensor], *, mode: str = "mean") -> Tensor:
    """One target from several teachers' logits [N, C], returned as log-probabilities (usable as logits).

    mean:              log( (1/M) sum_m softmax(z_m) )  — the ensemble's predictive distribution;
    entropy_balanced:  log( (1/M) sum_m softmax(z_m / T_m) ), each T_m chosen so that teacher m's mean
                       entropy on the batch equals the teachers' average entropy at T = 1, so that an
                       over-confident teacher does not dominate the mixture and a diffuse one does not vanish.
    (Multi-teacher KD: Hinton et al. 2015's ensembles; entropy-based balancing as in e.g. Kwon et al. 2020,
    adaptive multi-teacher KD.)"""
    if not teacher_logits:
        raise ValueError("teacher_logits: give at least one teacher's logits")
    shapes = {tuple(z.shape) for z in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"teacher_logits: every teacher must give the same [N, C] shape, got {sorted(shapes)}")
    dtype = torch.promote_types(teacher_logits[0].dtype, torch.float32)
    logits = [z.to(dtype) for z in teacher_logits]
    if mode == "mean":
        temperatures = [1.0] * len(logits)
    elif mode == "entropy_balanced":
        target = sum(_mean_entropy(z, 1.0) for z in logits) / len(logits)
        temperatures = [balancing_temperature(z, target) for z in logits]
    else:
        raise ValueError(f"mode must be `mean` or `entropy_balanced`, got `{mode}`")
    stacked = torch.stack([torch.log_softmax(z / t, dim=-1) for z, t in zip(logits, temperatures)])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))
