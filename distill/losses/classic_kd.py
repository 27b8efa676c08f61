"""Classifier KD terms: KD (Hinton et al. 2015), DKD (Zhao et al. 2022), NKD (Yang et al. 2023), and logit
standardisation (Sun et al. 2024). Conventions: see distill.losses.classic."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.classic_common import (check_temperature, kl_rows, log_softmax, non_target, prepare, target,
                                           temperature_param)
from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register

__all__ = ["dkd", "dkd_warmup", "hinton_kd", "kd_decomposition", "nckd", "nkd", "standardize_logits", "tckd"]

_STANDARDIZE = Param(False, "bool", doc="Z-score both logits before the temperature (Sun et al. CVPR 2024)")
_DKD_PAPER = "Zhao et al. CVPR 2022, Decoupled Knowledge Distillation"


# ---------------------------------------------------------------------------------------------
# Logit standardisation (Sun et al. CVPR 2024)
# ---------------------------------------------------------------------------------------------

def standardize_logits(logits: Tensor, eps: float = 1e-7, *, unbiased: bool = True) -> Tensor:
    """Z-score each row: (z - mean(z)) / (std(z) + eps), over the last (class) dimension of [..., C].

    Source: Sun et al. CVPR 2024, "Logit Standardization in Knowledge Distillation". The official code
    (sunshangquan/logit-standardization-KD, `normalize`) uses torch.std, i.e. the Bessel-corrected
    std with 1/(C-1), which is our default; unbiased=False gives the 1/C population std. The two differ
    by sqrt(C/(C-1)), 0.5% at C = 100. The paper then divides by a base temperature (2 or 3 in its
    CIFAR-100 runs): that is the `temperature` of the loss. Computed in float32 at least.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be a floating-point tensor [..., C] with C >= 2 classes, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    eps = check_number("eps", eps, 0.0, None, fix="eps guards against a constant row; keep it small, e.g. 1e-7")
    logits = logits.to(compute_dtype(logits))
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return centred / (logits.std(dim=-1, keepdim=True, correction=1 if unbiased else 0) + eps)


def _maybe_standardize(student: Tensor, teacher: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be True or False, got {standardize!r}")
    return (standardize_logits(student), standardize_logits(teacher)) if standardize else (student, teacher)


# ---------------------------------------------------------------------------------------------
# KD (Hinton et al. 2015)
# ---------------------------------------------------------------------------------------------

@register("kd", kind="classifier", needs_labels=True,
          formula="alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1-alpha) CE(s, y)",
          paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
          params={"temperature": temperature_param(4.0),
                  "alpha": Param(0.9, "float", low=0, high=1, doc="weight of the soft-target KL; 1 - alpha weighs "
                                                                  "CE with the labels (alpha = 1: no labels needed)"),
                  "standardize": _STANDARDIZE})
def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
              temperature: float = 4.0, alpha: float = 0.9, standardize: bool = False) -> Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels), averaged over examples.

    Source: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (T^2 keeps the
    soft-target gradients on the scale of the hard-label ones as T grows).
    Parameters: temperature T > 0 (default 4); alpha in [0, 1], the soft-target weight (default 0.9).
    alpha = 1 is pure KD and labels may then be None. standardize=True Z-scores both logits
    (`standardize_logits`) before dividing by T, as in Sun et al. CVPR 2024, whose CIFAR-100 recipe is
    T = 2 with KD weight 9 and CE weight 0.1 (alpha ~ 0.989 up to scale); the CE term always sees the raw
    student logits, as there. The defaults T = 4, alpha = 0.9 are mdistiller's KD defaults.
    """
    temperature = check_temperature(temperature)
    alpha = check_number("alpha", alpha, 0.0, 1.0, fix="alpha is the soft-target weight; 1 means no CE term")
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=alpha < 1.0,
                                        loss_name=f"hinton_kd with alpha = {alpha} < 1 (the CE term)")
    soft_student, soft_teacher = _maybe_standardize(student, teacher, standardize)
    kl = kl_rows(log_softmax(soft_teacher, temperature), log_softmax(soft_student, temperature)).mean()
    loss = alpha * temperature ** 2 * kl
    if alpha < 1.0:
        loss = loss - (1.0 - alpha) * target(log_softmax(student), labels).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# DKD (Zhao et al. CVPR 2022)
# ---------------------------------------------------------------------------------------------

def _decomposition(student: Tensor, teacher: Tensor, labels: Tensor,
                   temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    student_logprobs, teacher_logprobs = log_softmax(student, temperature), log_softmax(teacher, temperature)
    kl = kl_rows(teacher_logprobs, student_logprobs)

    def binary(logprobs: Tensor) -> Tensor:
        # log(1 - p_t) as a logsumexp over the other classes: exact even when p_t rounds to 1.
        return torch.stack([target(logprobs, labels), torch.logsumexp(non_target(logprobs, labels), dim=-1)], -1)

    tckd_per_example = kl_rows(binary(teacher_logprobs), binary(student_logprobs))
    # Renormalised non-target distributions straight from the non-target logits (no 1/(1 - p_t) division).
    nckd_per_example = kl_rows(log_softmax(non_target(teacher, labels), temperature),
                                log_softmax(non_target(student, labels), temperature))
    return kl, tckd_per_example, nckd_per_example, target(teacher_logprobs, labels).exp()


def kd_decomposition(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-example (KL, TCKD, NCKD, p^T_t), each [N], at temperature T (no T^2 factor).

    KL = KL(p^T || p^S) over all classes; TCKD = KL(b^T || b^S) with b = (p_t, 1 - p_t) the binary
    target / non-target split; NCKD = KL(p_hat^T || p_hat^S) with p_hat the distribution over the
    non-target classes renormalised (p_hat_c = p_c / (1 - p_t)); p^T_t the teacher's target probability.
    Identity (Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation", Sec. 3.1):
    KL = TCKD + (1 - p^T_t) * NCKD.
    """
    temperature = check_temperature(temperature)
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="kd_decomposition")
    return _decomposition(student, teacher, labels, temperature)


def tckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Target-class KD: T^2 * KL(b^T || b^S), b = (p_t, 1 - p_t) at temperature T, averaged over examples.
    (Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation".)"""
    _, tckd_per_example, _, _ = kd_decomposition(student_logits, teacher_logits, labels, temperature)
    return temperature ** 2 * tckd_per_example.mean()


def nckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Non-target-class KD: T^2 * KL(p_hat^T || p_hat^S) over the renormalised non-target classes at
    temperature T, averaged over examples. (Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation".)"""
    _, _, nckd_per_example, _ = kd_decomposition(student_logits, teacher_logits, labels, temperature)
    return temperature ** 2 * nckd_per_example.mean()


@register("dkd", kind="classifier", needs_labels=True, paper=_DKD_PAPER,
          formula="T^2 (alpha KL(b^T || b^S) + beta KL(p_hat^T || p_hat^S)); b = (p_y, 1-p_y), "
                  "p_hat: non-target renormalised",
          params={"temperature": temperature_param(4.0),
                  "alpha": Param(1.0, "float", low=0, doc="weight of TCKD, the target / non-target split"),
                  "beta": Param(8.0, "float", low=0, doc="weight of NCKD, the distribution over non-target classes"),
                  "standardize": _STANDARDIZE})
def dkd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, standardize: bool = False) -> Tensor:
    """Decoupled KD: T^2 * (alpha * TCKD + beta * NCKD), averaged over examples (see `kd_decomposition`).

    Source: Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation"; the T^2 factor is from the official
    code (megvii-research/mdistiller, DKD.py), which also adds a separate CE term (weight 1) and multiplies
    the DKD loss by `dkd_warmup(epoch, 20)`: both belong to the recipe, not to this function.
    Parameters: temperature T > 0 (default 4); alpha >= 0 (default 1) and beta >= 0 (default 8): the
    official CIFAR-100 defaults (its ImageNet config: beta = 0.5, T = 1, warm-up 1 epoch). standardize=True
    Z-scores both logits first (Sun et al. CVPR 2024; base temperature 2 and DKD weight 9 there).
    """
    temperature = check_temperature(temperature)
    alpha = check_number("alpha", alpha, 0.0, None, fix="alpha weights TCKD and must be non-negative")
    beta = check_number("beta", beta, 0.0, None, fix="beta weights NCKD and must be non-negative")
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="dkd")
    student, teacher = _maybe_standardize(student, teacher, standardize)
    _, tckd_per_example, nckd_per_example, _ = _decomposition(student, teacher, labels, temperature)
    return temperature ** 2 * (alpha * tckd_per_example + beta * nckd_per_example).mean()


def dkd_warmup(step: float, warmup_steps: float) -> float:
    """DKD's linear warm-up factor: min(step / warmup_steps, 1); 1 when warmup_steps is 0.

    The official code multiplies the DKD loss by min(epoch / 20, 1) (epochs counted from 1).
    """
    step = check_number("step", step, 0.0, None, fix="pass the current step or epoch, counted from 0 or 1")
    warmup_steps = check_number("warmup_steps", warmup_steps, 0.0, None, fix="use 0 for no warm-up")
    return 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)


# ---------------------------------------------------------------------------------------------
# NKD (Yang et al. ICCV 2023)
# ---------------------------------------------------------------------------------------------

@register("nkd", kind="classifier", needs_labels=True,
          formula="-p^T_y log p^S_y - gamma T^2 sum_{c != y} N(p^T_c) log N(p^S_c); N = non-target renormalised at T",
          paper="Yang et al. ICCV 2023, From Knowledge Distillation to Self-Knowledge Distillation: A Unified "
                "Approach with Normalized Loss and Customized Soft Labels",
          params={"temperature": temperature_param(1.0),
                  "gamma": Param(1.5, "float", low=0, doc="weight of the normalised non-target term")})
def nkd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
        temperature: float = 1.0, gamma: float = 1.5) -> Tensor:
    """Normalized KD, averaged over examples:

        -p^T_t log p^S_t - gamma * T^2 * sum_{i != t} N(q^T)_i log N(q^S)_i

    p^T_t, p^S_t: teacher / student probabilities of the target class t at temperature 1 (no temperature on
    this term). N(q)_i: the non-target probabilities at temperature T renormalised to sum to 1 (softmax of
    the non-target logits / T). The non-target term is a cross-entropy, not a KL: the value includes the
    teacher's normalised non-target entropy, a constant for the student, so it is not 0 when student =
    teacher. Source: Yang et al. ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels", its L_NKD; the official code
    (yzd-v/cls_KD, nkd.py) computes exactly this. Parameters: temperature T > 0 (default 1), gamma >= 0
    (default 1.5), the values the official code suggests. No `standardize` flag: the target term is a
    weighted CE on raw probabilities, which standardising would soften, and Sun et al. did not evaluate NKD.
    """
    temperature = check_temperature(temperature)
    gamma = check_number("gamma", gamma, 0.0, None, fix="gamma weights the non-target term and must be non-negative")
    student, teacher, labels = prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="nkd")
    target_term = -target(log_softmax(teacher), labels).exp() * target(log_softmax(student), labels)
    teacher_non_target = log_softmax(non_target(teacher, labels), temperature).exp()
    student_non_target = log_softmax(non_target(student, labels), temperature)
    non_target_term = -(teacher_non_target * student_non_target).sum(dim=-1)
    return (target_term + gamma * temperature ** 2 * non_target_term).mean()
