"""Classifier distillation objectives: KD, DKD, NKD, PLD, OFA, and logit standardisation.

Every loss has the same signature and reduction, so a recipe can pick one by name:

    fn(student_logits [N, C], teacher_logits [N, C], labels [N] | None, *, temperature=..., **params) -> scalar

- logits are one row per example; labels are class indices in [0, C) (None only where a loss needs none);
- the value is the mean over the N examples;
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64;
- unlike the LM divergences in `logits.py`, the temperature conventions are each paper's own (KD and DKD
  multiply by T^2, NKD's non-target term too, PLD softens only the teacher's weights, OFA has no T^2).

Gradients flow to both logits; a trainer passes teacher logits computed under no_grad.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from distill.losses.logits import _floored
from distill.losses.logits import compute_dtype as _compute_dtype

__all__ = [
    "CLASSIC_FORMULAS", "CLASSIC_PAPERS", "CLASSIC_REGISTRY", "classic_parameters", "dkd", "dkd_warmup",
    "get_classic_loss", "hinton_kd", "kd_decomposition", "nckd", "nkd", "ofa_loss", "plackett_luce_loss", "pld",
    "standardize_logits", "tckd",
]


# ---------------------------------------------------------------------------------------------
# Validation and shared pieces
# ---------------------------------------------------------------------------------------------

def _number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
            fix: str = "") -> float:
    """`value` as a finite float >= low (> low if low_open) and <= high; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ValueError(f"{name} must be finite and {bounds}, got {value}" + (f": {fix}" if fix else ""))
    return value


def _temperature(value: object) -> float:
    return _number("temperature", value, low=0.0, low_open=True, fix="pass a positive temperature, e.g. 1.0 or 4.0")


def _check_logits(student_logits: Tensor, teacher_logits: Tensor | None = None) -> None:
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


def _check_labels(labels: Tensor | None, num_examples: int, num_classes: int, *, required: bool,
                  loss_name: str) -> Tensor | None:
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


def _prepare(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, labels_required: bool,
             loss_name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate, then upcast both logits to the compute dtype: (student, teacher, labels as long or None)."""
    _check_logits(student_logits, teacher_logits)
    labels = _check_labels(labels, *student_logits.shape, required=labels_required, loss_name=loss_name)
    dtype = _compute_dtype(student_logits, teacher_logits)
    return student_logits.to(dtype), teacher_logits.to(dtype), labels


def _log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    # Floored (see logits._floored) so a -inf logit gives a finite log-probability and no NaN in p log p.
    return _floored(torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1))


def _kl_rows(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) per row, from finite log-probabilities: sum_c p_c (log p_c - log q_c)."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(dim=-1)


def _non_target(values: Tensor, labels: Tensor) -> Tensor:
    """The C-1 columns of `values` [N, C] other than each row's label, in class order: [N, C-1]."""
    num_examples, num_classes = values.shape
    keep = torch.arange(num_classes, device=values.device) != labels.unsqueeze(-1)
    return values[keep].view(num_examples, num_classes - 1)


def _target(values: Tensor, labels: Tensor) -> Tensor:
    return values.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


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
    eps = _number("eps", eps, low=0.0, fix="eps guards against a constant row; keep it small, e.g. 1e-7")
    logits = logits.to(_compute_dtype(logits))
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return centred / (logits.std(dim=-1, keepdim=True, correction=1 if unbiased else 0) + eps)


def _maybe_standardize(student: Tensor, teacher: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be True or False, got {standardize!r}")
    return (standardize_logits(student), standardize_logits(teacher)) if standardize else (student, teacher)


# ---------------------------------------------------------------------------------------------
# KD (Hinton et al. 2015)
# ---------------------------------------------------------------------------------------------

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
    temperature = _temperature(temperature)
    alpha = _number("alpha", alpha, low=0.0, high=1.0, fix="alpha is the soft-target weight; 1 means no CE term")
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=alpha < 1.0,
                                        loss_name=f"hinton_kd with alpha = {alpha} < 1 (the CE term)")
    soft_student, soft_teacher = _maybe_standardize(student, teacher, standardize)
    kl = _kl_rows(_log_softmax(soft_teacher, temperature), _log_softmax(soft_student, temperature)).mean()
    loss = alpha * temperature ** 2 * kl
    if alpha < 1.0:
        loss = loss - (1.0 - alpha) * _target(_log_softmax(student), labels).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# DKD (Zhao et al. CVPR 2022)
# ---------------------------------------------------------------------------------------------

def _decomposition(student: Tensor, teacher: Tensor, labels: Tensor,
                   temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    student_logprobs, teacher_logprobs = _log_softmax(student, temperature), _log_softmax(teacher, temperature)
    kl = _kl_rows(teacher_logprobs, student_logprobs)

    def binary(logprobs: Tensor) -> Tensor:
        # log(1 - p_t) as a logsumexp over the other classes: exact even when p_t rounds to 1.
        return torch.stack([_target(logprobs, labels), torch.logsumexp(_non_target(logprobs, labels), dim=-1)], -1)

    tckd_per_example = _kl_rows(binary(teacher_logprobs), binary(student_logprobs))
    # Renormalised non-target distributions straight from the non-target logits (no 1/(1 - p_t) division).
    nckd_per_example = _kl_rows(_log_softmax(_non_target(teacher, labels), temperature),
                                _log_softmax(_non_target(student, labels), temperature))
    return kl, tckd_per_example, nckd_per_example, _target(teacher_logprobs, labels).exp()


def kd_decomposition(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-example (KL, TCKD, NCKD, p^T_t), each [N], at temperature T (no T^2 factor).

    KL = KL(p^T || p^S) over all classes; TCKD = KL(b^T || b^S) with b = (p_t, 1 - p_t) the binary
    target / non-target split; NCKD = KL(p_hat^T || p_hat^S) with p_hat the distribution over the
    non-target classes renormalised (p_hat_c = p_c / (1 - p_t)); p^T_t the teacher's target probability.
    Identity (Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation", Sec. 3.1):
    KL = TCKD + (1 - p^T_t) * NCKD.
    """
    temperature = _temperature(temperature)
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=True,
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
    temperature = _temperature(temperature)
    alpha = _number("alpha", alpha, low=0.0, fix="alpha weights TCKD and must be non-negative")
    beta = _number("beta", beta, low=0.0, fix="beta weights NCKD and must be non-negative")
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="dkd")
    student, teacher = _maybe_standardize(student, teacher, standardize)
    _, tckd_per_example, nckd_per_example, _ = _decomposition(student, teacher, labels, temperature)
    return temperature ** 2 * (alpha * tckd_per_example + beta * nckd_per_example).mean()


def dkd_warmup(step: float, warmup_steps: float) -> float:
    """DKD's linear warm-up factor: min(step / warmup_steps, 1); 1 when warmup_steps is 0.

    The official code multiplies the DKD loss by min(epoch / 20, 1) (epochs counted from 1).
    """
    step = _number("step", step, low=0.0, fix="pass the current step or epoch, counted from 0 or 1")
    warmup_steps = _number("warmup_steps", warmup_steps, low=0.0, fix="use 0 for no warm-up")
    return 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)


# ---------------------------------------------------------------------------------------------
# NKD (Yang et al. ICCV 2023)
# ---------------------------------------------------------------------------------------------

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
    temperature = _temperature(temperature)
    gamma = _number("gamma", gamma, low=0.0, fix="gamma weights the non-target term and must be non-negative")
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="nkd")
    target_term = -_target(_log_softmax(teacher), labels).exp() * _target(_log_softmax(student), labels)
    teacher_non_target = _log_softmax(_non_target(teacher, labels), temperature).exp()
    student_non_target = _log_softmax(_non_target(student, labels), temperature)
    non_target_term = -(teacher_non_target * student_non_target).sum(dim=-1)
    return (target_term + gamma * temperature ** 2 * non_target_term).mean()


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
    _check_logits(student_logits)
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
    return _plackett_luce(student_logits.to(_compute_dtype(student_logits, weights)), permutation.long(), weights)


def _plackett_luce(student: Tensor, permutation: Tensor, weights: Tensor) -> Tensor:
    ranked = student.gather(-1, permutation)
    # logsumexp over ranks j >= k: a cumulative logsumexp run from the last rank backwards.
    suffix_logsumexp = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    return (weights.to(ranked.dtype) * (suffix_logsumexp - ranked)).sum(dim=-1).mean()


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
    temperature = _temperature(temperature)
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="pld")
    by_teacher = torch.sort(teacher, dim=-1, descending=True, stable=True).indices
    others = by_teacher[by_teacher != labels.unsqueeze(-1)].view(teacher.shape[0], teacher.shape[1] - 1)
    permutation = torch.cat([labels.unsqueeze(-1), others], dim=-1)
    weights = torch.softmax(teacher / temperature, dim=-1).gather(-1, permutation)
    return _plackett_luce(student, permutation, weights)


# ---------------------------------------------------------------------------------------------
# OFA (Hao et al. NeurIPS 2023)
# ---------------------------------------------------------------------------------------------

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
    temperature = _temperature(temperature)
    eps = _number("eps", eps, low=0.0, low_open=True, fix="eps is OFA's modulating exponent, e.g. 1.0 to 1.5")
    student, teacher, labels = _prepare(student_logits, teacher_logits, labels, labels_required=True,
                                        loss_name="ofa_loss")
    target_mask = torch.nn.functional.one_hot(labels, student.shape[-1]).to(student.dtype)
    teacher_probs = _log_softmax(teacher, temperature).exp()
    class_weights = (teacher_probs + target_mask) ** eps - target_mask
    return -(class_weights * _log_softmax(student, temperature)).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

CLASSIC_REGISTRY: dict[str, Callable[..., Tensor]] = {
    "kd": hinton_kd,
    "dkd": dkd,
    "nkd": nkd,
    "pld": pld,
    "ofa": ofa_loss,
}

CLASSIC_FORMULAS: dict[str, str] = {
    "kd": "alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1-alpha) CE(s, y)",
    "dkd": "T^2 (alpha KL(b^T || b^S) + beta KL(p_hat^T || p_hat^S)); b = (p_y, 1-p_y), p_hat: non-target renormalised",
    "nkd": "-p^T_y log p^S_y - gamma T^2 sum_{c != y} N(p^T_c) log N(p^S_c); N = non-target renormalised at T",
    "pld": "sum_k softmax(t/T)_{pi_k} [logsumexp_{j>=k} s_{pi_j} - s_{pi_k}]; pi = (y, rest by decreasing t)",
    "ofa": "-sum_c [(p^T_c + 1[c=y])^eps - 1[c=y]] log p^S_c, p = softmax(./T)",
}

CLASSIC_PAPERS: dict[str, str] = {
    "kd": "Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
    "dkd": "Zhao et al. CVPR 2022, Decoupled Knowledge Distillation",
    "nkd": "Yang et al. ICCV 2023, From Knowledge Distillation to Self-Knowledge Distillation: A Unified "
           "Approach with Normalized Loss and Customized Soft Labels",
    "pld": "Bassam et al. 2025, PLD: A Choice-Theoretic List-Wise Knowledge Distillation (arXiv:2506.12542)",
    "ofa": "Hao et al. NeurIPS 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in "
           "Knowledge Distillation",
}


def get_classic_loss(name: str) -> Callable[..., Tensor]:
    """The classifier loss registered under `name`; ValueError listing the valid names otherwise."""
    if name not in CLASSIC_REGISTRY:
        raise ValueError(f"unknown classifier loss {name!r}; valid names: {', '.join(CLASSIC_REGISTRY)}")
    return CLASSIC_REGISTRY[name]


def classic_parameters(name: str) -> dict[str, object]:
    """The keyword parameters of `name` with their defaults, temperature included, e.g.
    {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "standardize": False} for dkd."""
    signature = inspect.signature(get_classic_loss(name))
    return {parameter.name: parameter.default for parameter in signature.parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
