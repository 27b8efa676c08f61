"""Further divergences: alpha-beta (ABKD), adaptive KL (AKL), TAID, Sinkhorn (SinKD); plus the TAID schedule,
the student-entropy regulariser and TSD-KD token selection (not divergences, not registered).

The divergences follow every convention of `distill.losses.logits` (signature, temperature on both logits
without T^2, float32-or-wider compute, vocabulary sum then valid-token mean, robust to -inf teacher logits) and
are registered in the one loss registry (`distill.losses.registry`). Exception: `sinkhorn` couples the tokens of a
call (its spec says token_separable=False).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.common import (check_inputs, compute_dtype, floored, kl_per_token, log_probs, masked_mean,
                                   valid_rows)
from distill.losses.registry import Param, check_number, register

__all__ = [
    "TaidSchedule", "ab_divergence", "adaptive_kl", "select_tokens", "sinkhorn",
    "student_entropy", "taid",
]


# ---------------------------------------------------------------------------------------------
# ABKD: alpha-beta divergence
# ---------------------------------------------------------------------------------------------

def _exp_times_expm1(log_base: Tensor, z: Tensor) -> Tensor:
    """exp(log_base) * (exp(z) - 1) without cancellation (|z| < 1: expm1) or overflow (|z| >= 1:
    exp(log_base + z) - exp(log_base), exponent <= 0 for non-negative alpha, beta). Exponents saturate at
    half the dtype's log-max (only negative alpha/beta near zero probabilities, where the exact value is
    astronomically large): finite, never NaN. Both branches see masked safe inputs, so no NaN gradients.
    """
    cap = 0.5 * math.log(torch.finfo(log_base.dtype).max)
    small = z.abs() < 1.0
    near = log_base.clamp(max=cap).exp() * torch.expm1(torch.where(small, z, 0.0))
    far = (log_base + torch.where(small, 0.0, z)).clamp(max=cap).exp() - log_base.clamp(max=cap).exp()
    return torch.where(small, near, far)


def _power_expm1_ratio(log_base: Tensor, x: float, d: Tensor) -> Tensor:
    """exp(log_base) * (exp(x d) - 1) / x, and its limit exp(log_base) * d at x = 0."""
    if x == 0.0:
        return log_base.clamp(max=0.5 * math.log(torch.finfo(log_base.dtype).max)).exp() * d
    return _exp_times_expm1(log_base, x * d) / x


def _ab_per_token(teacher_logprobs: Tensor, student_logprobs: Tensor, alpha: float, beta: float) -> Tensor:
    """D_AB(p_T || p_S) per token, rewritten to stay accurate near the limit cases.

    With a = log p_T, b = log p_S, s = alpha + beta and d = b - a, each vocabulary term of the paper's
    -1/(alpha beta) (p^alpha q^beta - alpha/s p^s - beta/s q^s) equals
        p^s [expm1(s d)/s - expm1(beta d)/beta] / alpha,
    and, swapping the roles (c = a - b), q^s [expm1(s c)/s - expm1(alpha c)/alpha] / beta. Dividing by the
    larger of |alpha|, |beta| keeps the bracket free of cancellation as the other one goes to 0, and
    expm1(x y)/x -> y gives the paper's limit cases (s = 0, alpha = 0, beta = 0) continuously.
    """
    if alpha == 0.0 and beta == 0.0:
        return 0.5 * ((teacher_logprobs - student_logprobs) ** 2).sum(dim=-1)
    total = alpha + beta
    if abs(alpha) >= abs(beta):
        log_base, d, other, divisor = total * teacher_logprobs, student_logprobs - teacher_logprobs, beta, alpha
    else:
        log_base, d, other, divisor = total * student_logprobs, teacher_logprobs - student_logprobs, alpha, beta
    terms = (_power_expm1_ratio(log_base, total, d) - _power_expm1_ratio(log_base, other, d)) / divisor
    return terms.sum(dim=-1)


@register("ab_divergence", kind="token", aliases=("abkd",),
          formula="-1/(alpha beta) sum_v (p_T^alpha p_S^beta - alpha/(alpha+beta) p_T^(alpha+beta) "
                  "- beta/(alpha+beta) p_S^(alpha+beta)); (1,0): KL(p_T||p_S), (0,1): KL(p_S||p_T)",
          paper="Wang et al. 2025, ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge "
                "Distillation via alpha-beta-Divergence (ICML 2025)",
          params={"alpha": Param(0.5, "float", doc="exponent of the teacher (hardness-concentration), any real"),
                  "beta": Param(0.5, "float", doc="exponent of the student (confidence-concentration), any real")})
def ab_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                  temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None,
                  alpha: float = 0.5, beta: float = 0.5) -> Tensor:
    """Alpha-beta divergence D_AB(p_T || p_S) (Cichocki et al. 2011), the ABKD objective.

    D = -1/(alpha beta) sum_v [p_T^alpha p_S^beta - alpha/(alpha+beta) p_T^(alpha+beta)
                                - beta/(alpha+beta) p_S^(alpha+beta)]        for alpha, beta, alpha+beta != 0,
    and its continuous limits elsewhere, as the paper defines them:
      beta = 0:          1/alpha^2 sum_v [p_T^alpha log(p_T^alpha / p_S^alpha) - p_T^alpha + p_S^alpha]
                         (alpha = 1: forward KL(p_T || p_S));
      alpha = 0:         1/beta^2 sum_v [p_S^beta log(p_S^beta / p_T^beta) - p_S^beta + p_T^beta]
                         (beta = 1: reverse KL(p_S || p_T));
      alpha + beta = 0:  1/alpha^2 sum_v [log(p_S^alpha / p_T^alpha) + (p_S^alpha / p_T^alpha)^-1 - 1];
      alpha = beta = 0:  1/2 sum_v (log p_T - log p_S)^2.
    (alpha, beta) trade off the paper's two effects, hardness-concentration (focus on modes with large
    error) and confidence-concentration (focus on modes the student is confident about), which FKL has
    too weakly and RKL too strongly. alpha + beta = 1 is the alpha-divergence family; alpha = beta = 0.5
    is four times the squared Hellinger distance.

    Source: Wang et al. 2025, "ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge
    Distillation via alpha-beta-Divergence" (ICML 2025). Parameters: alpha, beta, any finite reals,
    defaults 0.5 / 0.5: the midpoint between FKL (1, 0) and RKL (0, 1) (also a public re-implementation's
    default); the paper tunes (alpha, beta) per task, so tune them. The limit cases use Cichocki et al.'s
    1/alpha^2 (1/beta^2) factor, which makes D continuous in (alpha, beta); the authors' code uses 1/alpha
    (1/beta) there, which agrees only at alpha (beta) = 1. Negative alpha or beta make D blow up where a
    probability is ~0; values then saturate (finite, no NaN).
    """
    alpha = check_number("alpha", alpha, -math.inf, math.inf, low_open=True, high_open=True)
    beta = check_number("beta", beta, -math.inf, math.inf, low_open=True, high_open=True)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    return masked_mean(_ab_per_token(teacher_logprobs, student_logprobs, alpha, beta), None, num_valid_tokens)


# ---------------------------------------------------------------------------------------------
# AKL: adaptive mix of forward and reverse KL
# ---------------------------------------------------------------------------------------------

def _akl_head_weight(teacher_logprobs: Tensor, student_logprobs: Tensor, mu: float) -> Tensor:
    """w_head = g_head / (g_head + g_tail) per token, computed without gradient.

    The head is decided in teacher-sorted order and scattered back to vocabulary order before it meets
    the (unsorted) probabilities: applying the sorted-order mask to unsorted tensors is a known pitfall.
    """
    with torch.no_grad():
        teacher_probs, student_probs = teacher_logprobs.exp(), student_logprobs.exp()
        sorted_probs, order = torch.sort(teacher_probs, dim=-1, descending=True, stable=True)
        head_sorted = sorted_probs.cumsum(dim=-1) <= mu
        head_sorted[..., 0] = True  # the teacher's top-1 token is always head
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (teacher_probs - student_probs).abs()
        gap_head = torch.where(head, gap, 0.0).sum(dim=-1)
        gap_total = gap.sum(dim=-1)
        # identical distributions: both KLs are 0, any weight will do
        return torch.where(gap_total > 0, gap_head / gap_total.clamp(min=torch.finfo(gap.dtype).tiny), 0.5)


@register("adaptive_kl", kind="token", aliases=("akl",),
          formula="w_head KL(p_T||p_S) + (1-w_head) KL(p_S||p_T), w_head = sum_head |p_T-p_S| / sum_v |p_T-p_S|, "
                  "head = teacher's top tokens with cumulative mass <= mu",
          paper="Wu et al. 2025, Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large "
                "Language Models (COLING 2025)",
          params={"mu": Param(0.5, "float", low=0, high=1,
                              doc="teacher mass of the head (its top tokens), whose error weighs forward KL")})
def adaptive_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None,
                mu: float = 0.5) -> Tensor:
    """Adaptive KL: w_head KL(p_T || p_S) + w_tail KL(p_S || p_T), weights chosen per token.

    Sort the teacher distribution in descending order; the head is the top tokens whose cumulative
    teacher mass is <= mu (always at least the top-1 token), the tail the rest. With
    g_head = sum_{v in head} |p_T(v) - p_S(v)| and g_tail likewise over the tail,
    w_head = g_head / (g_head + g_tail) and w_tail = 1 - w_head: forward KL (which mostly fixes the head)
    gets the weight of the head's error, reverse KL (which mostly fixes the tail) that of the tail's.
    The weights are detached (no gradient flows through them), as in the authors' code, which detaches
    the student probabilities (the teacher is frozen there); the head set is the authors' `cumsum <= mu`.

    Source: Wu et al. 2025, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
    Language Models" (COLING 2025). Parameter: mu in [0, 1], default 0.5 (the authors' default).
    """
    mu = check_number("mu", mu, 0.0, 1.0)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    head_weight = _akl_head_weight(teacher_logprobs, student_logprobs, mu)
    per_token = (head_weight * kl_per_token(teacher_logprobs, student_logprobs)
                 + (1.0 - head_weight) * kl_per_token(student_logprobs, teacher_logprobs))
    return masked_mean(per_token, None, num_valid_tokens)


# ---------------------------------------------------------------------------------------------
# TAID: KL to a teacher-student interpolation, and the schedule of the interpolation
# ---------------------------------------------------------------------------------------------

@register("taid", kind="token", schedule="taid",
          formula="KL(p_t || p_S), p_t = softmax((1-t) sg(z_S) + t z_T); t from TaidSchedule",
          paper="Shing et al. 2025, TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge "
                "Transfer in Language Models (ICLR 2025)",
          params={"t": Param(1.0, "float", low=0, high=1, doc="interpolation weight of the teacher; 1 is forward KL "
                                                              "(without it, TAID's schedule sets t each step)")})
def taid(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
         temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None, t: float = 1.0) -> Tensor:
    """TAID: KL(p_t || p_S) with the intermediate target p_t = softmax((1 - t) sg(z_S) + t z_T).

    z_S, z_T are the temperature-scaled logits and sg() stops the gradient, so the target moves with
    the student but the student is only trained through log p_S. t = 1 is exactly forward_kl; t = 0
    makes the target the (detached) student itself, so the loss and its gradient are 0. In training, t
    comes from a TaidSchedule (the trainer owns it and passes `t=` each step). The interpolation is done
    on log-probabilities, which equals interpolating logits (softmax ignores per-token shifts) but stays
    finite for -inf teacher logits.

    Source: Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models" (ICLR 2025). Parameter: t in [0, 1], default 1.0.
    """
    t = check_number("t", t, 0.0, 1.0)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    if t == 1.0:
        target_logprobs = teacher_logprobs
    elif t == 0.0:
        target_logprobs = student_logprobs.detach()
    else:
        target_logprobs = torch.log_softmax((1.0 - t) * student_logprobs.detach() + t * teacher_logprobs, dim=-1)
    return masked_mean(kl_per_token(target_logprobs, student_logprobs), None, num_valid_tokens)


class TaidSchedule:
    """The adaptive schedule of TAID's interpolation parameter t (Shing et al. 2025, as in the authors' code).

    Each step, with the step's loss L and the previous one L':
        m   <- beta m + (1 - beta) (L' - L) / (L' + 1e-15)     (momentum of the relative loss decrease)
        t   <- min(t_end, max(t_start + (t_end - t_start) progress, t + alpha sigmoid(m) (1 - t)))
    so t never decreases, never goes below the linear ramp from t_start to t_end, and is t_end at
    progress 1. The first call only records L. With disable_adaptive=True, t is the linear ramp.
    Defaults are the authors' code's: t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99.

    The trainer owns the object: `t = schedule.update(loss_value, step / total_steps)` after each
    optimizer step (loss_value: that step's TAID loss), `taid(..., t=schedule.t)` for the next, and
    `state_dict()` / `load_state_dict()` (plain JSON-serialisable dicts) in checkpoints.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 disable_adaptive: bool = False):
        self.t_start = check_number("t_start", t_start, 0.0, 1.0, high_open=True)
        self.t_end = check_number("t_end", t_end, self.t_start, 1.0)
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        self.beta = check_number("beta", beta, 0.0, 1.0)
        if not isinstance(disable_adaptive, bool):
            raise ValueError(f"disable_adaptive must be a bool, got {disable_adaptive!r}")
        self.disable_adaptive = disable_adaptive
        self.t = self.t_start
        self.prev_loss: float | None = None
        self.momentum = 0.0

    def update(self, loss_value: float, progress: float) -> float:
        """Record this step's loss and return the new t; progress = step / total_steps, in [0, 1]."""
        loss_value = check_number("loss_value", loss_value, -math.inf, math.inf, low_open=True, high_open=True)
        progress = check_number("progress", progress, 0.0, 1.0)
        if self.prev_loss is None:
            self.prev_loss = loss_value
            return self.t
        denominator = self.prev_loss + 1e-15
        relative_change = (self.prev_loss - loss_value) / denominator if denominator != 0 else 0.0
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        target = self.t_start + (self.t_end - self.t_start) * progress
        if self.disable_adaptive:
            self.t = target
        else:
            sigmoid = 0.5 * (1.0 + math.tanh(0.5 * self.momentum))  # cannot overflow
            step = self.alpha * sigmoid * (1.0 - self.t)
            self.t = min(self.t_end, max(target, self.t + step))
        self.prev_loss = loss_value
        return self.t

    def state_dict(self) -> dict:
        """Configuration and state as a JSON-serialisable dict (prev_loss is None before the first update)."""
        return {"t_start": self.t_start, "t_end": self.t_end, "alpha": self.alpha, "beta": self.beta,
                "disable_adaptive": self.disable_adaptive, "t": self.t, "prev_loss": self.prev_loss,
                "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (configuration included, so a resumed run continues exactly)."""
        missing = {"t_start", "t_end", "alpha", "beta", "disable_adaptive", "t", "prev_loss", "momentum"} - set(state)
        if missing:
            raise ValueError(f"TaidSchedule state lacks {', '.join(sorted(missing))}")
        self.__init__(state["t_start"], state["t_end"], state["alpha"], state["beta"], state["disable_adaptive"])
        self.t = check_number("t", state["t"], self.t_start, self.t_end)
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else check_number("prev_loss", prev, -math.inf, math.inf,
                                                            low_open=True, high_open=True)
        self.momentum = check_number("momentum", state["momentum"], -math.inf, math.inf, low_open=True, high_open=True)


# ---------------------------------------------------------------------------------------------
# SinKD: batch-wise Sinkhorn distance
# ---------------------------------------------------------------------------------------------

@register("sinkhorn", kind="token", aliases=("sinkd",), token_separable=False,
          formula="(1/N) sum_ij P_ij ||p_S,i - p_T,j||_1 over the N valid tokens, "
                  "P = Sinkhorn(exp(-C/epsilon)) (batch-wise; not token-separable)",
          paper="Cui et al. 2024, Sinkhorn Distance Minimization for Knowledge Distillation (LREC-COLING 2024)",
          params={"epsilon": Param(0.1, "float", low=0, low_open=True, doc="entropic regularisation of the transport"),
                  "iterations": Param(20, "int", low=1, doc="Sinkhorn-Knopp normalisation rounds")})
def sinkhorn(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
             temperature: float = 1.0, num_valid_tokens: int | Tensor | None = None,
             epsilon: float = 0.1, iterations: int = 20) -> Tensor:
    """Sinkhorn distance between the batch of student distributions and the batch of teacher distributions.

    What is transported (the paper's batch-wise reformulation): the N valid tokens of this call are
    N samples; student sample i is the vector p_S,i (over the vocabulary), teacher sample j is p_T,j.
    The ground cost is C_ij = ||p_S,i - p_T,j||_1 (the authors' code: cdist with p = 1), an N x N matrix.
    The transport plan P starts from the Gibbs kernel exp(-C / epsilon) and is alternately
    row- and column-normalised `iterations` times (Sinkhorn-Knopp, done in log space), so each student
    sample sends, and each teacher sample receives, about one unit of mass. The value is
        sum_ij P_ij C_ij / N
    i.e. the mean transport cost per valid token (the authors sum without dividing by N and scale by a
    constant weight; use kd_weight for that). Gradients flow through C and through the unrolled
    iterations (as in the authors' code); the computation is deterministic.

    Not a sum of per-token terms (token_separable=False): a token's cost depends on every other
    valid token of the call. `num_valid_tokens` only replaces the divisor N; under gradient accumulation
    each micro-batch solves its own transport problem, so the accumulated value is the token-weighted
    mean of per-micro-batch costs, not the cost of the whole batch; chunking over tokens is not exact.
    For identical inputs it is small but not 0 (the entropic plan leaks mass off the diagonal); it tends
    to 0 as epsilon -> 0. Time is O(N^2 V), cost and plan take O(N^2) memory: keep N per call moderate.

    Source: Cui et al. 2024, "Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING 2024).
    Parameters: epsilon > 0, entropic regularisation (default 0.1, the authors' code); iterations >= 1, an
    integer (default 20, the authors' code).
    """
    epsilon = check_number("epsilon", epsilon, 0.0, math.inf, low_open=True, high_open=True)
    iterations = check_number("iterations", iterations, 1, None, integer=True)
    student_logprobs, teacher_logprobs = log_probs(student_logits, teacher_logits, mask, temperature)
    if student_logprobs.shape[0] == 0:  # nothing valid: 0, still connected to the graph
        return masked_mean(student_logprobs.sum(dim=-1), None, num_valid_tokens)
    cost = torch.cdist(student_logprobs.exp(), teacher_logprobs.exp(), p=1)
    log_plan = -cost / epsilon
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True)
    per_sample = (log_plan.exp() * cost).sum(dim=1)
    return masked_mean(per_sample, None, num_valid_tokens)


# ---------------------------------------------------------------------------------------------
# Not divergences: entropy regulariser and token selection
# ---------------------------------------------------------------------------------------------

def _student_logprobs(student_logits: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    check_inputs(student_logits, student_logits, mask, temperature)
    rows = valid_rows(student_logits, mask).to(compute_dtype(student_logits))
    return floored(torch.log_softmax(rows / temperature, dim=-1))


def student_entropy(student_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0,
                    num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Mean entropy of the student per valid token: H = -sum_v p_S(v) log p_S(v), averaged like the divergences.

    A regulariser, not a registered loss. Sign: adding +entropy_weight * H to the loss MINIMISES entropy, i.e.
    makes the student more confident / peaked (TSD-KD adds such a term "to maintain the student's
    confidence", on its highest-entropy tokens: Kim & Baek 2026, "Explain in Your Own Words: Improving
    Reasoning via Token-Selective Dual Knowledge Distillation", ICLR 2026); adding -entropy_weight * H
    MAXIMISES entropy, a confidence penalty that keeps the student smoother / more exploratory (Pereyra
    et al. 2017, "Regularizing Neural Networks by Penalizing Confident Output Distributions").
    Source: see above. Temperature divides the logits as for the divergences.
    """
    logprobs = _student_logprobs(student_logits, mask, temperature)
    return masked_mean(-(logprobs.exp() * logprobs).sum(dim=-1), None, num_valid_tokens)


def select_tokens(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                  ratio: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Token selection by teacher-student relative confidence (TSD-KD): a bool mask, a subset of `mask`.

    Score per valid token: H(p_S) - H(p_T), the student's entropy minus the teacher's (temperature-scaled
    distributions). The ceil(ratio * N) valid tokens of this call (N valid tokens, all sequences
    together) with the largest score are kept: where the student is much less confident than the
    teacher. Ties keep the earlier position (row-major order), so the result is deterministic.
    Use with any divergence: fn(s, t, select_tokens(s, t, mask, ratio=r)); if you pass num_valid_tokens,
    count the selected tokens. Computed without gradient.

    Source: Kim & Baek 2026, "Explain in Your Own Words: Improving Reasoning via Token-Selective Dual
    Knowledge Distillation" (ICLR 2026). The authors' code weights every token's distillation loss by
    sigmoid(H(p_S) - H(p_T)) (a soft selection); this is the hard top-`ratio` version of that criterion.
    Parameter: ratio in (0, 1], default 0.5 (1 keeps every valid token).
    """
    ratio = check_number("ratio", ratio, 0.0, 1.0, low_open=True)
    with torch.no_grad():
        student_logprobs, teacher_logprobs = log_probs(student_logits.detach(), teacher_logits.detach(),
                                                        mask, temperature)
        score = ((teacher_logprobs.exp() * teacher_logprobs).sum(dim=-1)
                 - (student_logprobs.exp() * student_logprobs).sum(dim=-1))
        count = score.shape[0]
        keep = min(count, math.ceil(round(ratio * count, 9)))
        chosen = torch.sort(score, descending=True, stable=True).indices[:keep]
        kept_rows = torch.zeros(count, dtype=torch.bool, device=score.device)
        kept_rows[chosen] = True
        valid = (torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=score.device) if mask is None
                 else mask.to(device=score.device, dtype=torch.bool))
        selected = torch.zeros(valid.numel(), dtype=torch.bool, device=score.device)
        selected[valid.reshape(-1).nonzero().squeeze(1)] = kept_rows
        return selected.reshape(valid.shape)
