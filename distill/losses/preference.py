"""Preference distillation: losses over pairs of completions of one prompt, a chosen y_w and a rejected y_l.

The inputs are log-probabilities the caller computed with its models (token ids shared by student and
teacher): summed per sequence for DPO and REDI, full next-token distributions for DCKD and ADPA. Notation:
log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the completion's tokens (prompt and padding masked out).

- dpo (Rafailov et al. 2023): -log sigmoid(beta * [(lp_w - ref_w) - (lp_l - ref_l)]), the reference being the
  student's starting model or, as in LLaVA-MoD's preference distillation, the teacher.
- redi (Xu et al. 2025, REDI): -lp_w / |y_w| + alpha * lp_l / |y_l|, reference-free.
- dckd (Gao et al. 2025): forward KL(teacher || student) per token on both the chosen and the rejected response.
- adpa (Gao et al. 2025): -sum_v pi_S(v|s_t) * A(s_t, v), A = log pi_aligned - log pi_reference of the teacher:
  the teacher's advantage as a distribution-level reward for the student, on the student's own samples.

docs/preference_research.md has the sources, the reductions each paper (or its code) uses and what we chose
where they leave it open.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register

_GAO = ("Gao et al. 2025, Advantage-Guided Distillation for Preference Alignment in Small Language Models "
        "(ICLR 2025, arXiv 2502.17927)")


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """sum_t log softmax(logits)[t, labels[t]] over the positions `mask` marks: [B, L, V], [B, L], [B, L] -> [B].
    logits[:, t] predicts labels[:, t] (shift before calling)."""
    logprobs = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask.bool(), logprobs, 0.0).sum(-1)


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


@register("dpo", kind="preference",
          formula="-log sigmoid(beta [(lp_w - ref_w) - (lp_l - ref_l)]); label_smoothing e: "
                  "-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h) (cDPO)",
          paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290); reference = the teacher "
                "as in Shu et al. 2025, LLaVA-MoD (arXiv 2408.15881)",
          params={"beta": Param(0.1, "float", low=0, low_open=True, doc="inverse strength of the leash to the "
                                                                        "reference (0.1 to 0.5 usual)"),
                  "label_smoothing": Param(0.0, "float", low=0, high=0.5, high_open=True,
                                           doc="assumed probability that a pair's labels are flipped (cDPO)")},
          inputs="sequence")
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """Mean over pairs of -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h), with
    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); every input [B] (summed log-probs).

    Source: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7 (sums over completion tokens, no length
    normalisation, mean over pairs, as their code and TRL's `sigmoid` loss); label smoothing is their cDPO.
    """
    beta = check_number("beta", beta, 0, low_open=True)
    label_smoothing = check_number("label_smoothing", label_smoothing, 0, 0.5, high_open=True)
    _same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, reference_chosen=reference_chosen,
                reference_rejected=reference_rejected)
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean()


@register("redi", kind="preference",
          formula="-lp_w / |y_w| + alpha lp_l / |y_l| (no reference model)",
          paper="Xu et al. 2025, Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM "
                "Reasoning (REDI, arXiv 2505.24850)",
          params={"alpha": Param(0.8, "float", low=0, high=1, doc="weight of the push-down on the rejected trace "
                                                                  "(0 is SFT on the chosen one)")},
          inputs="sequence")
def redi_loss(policy_chosen: Tensor, chosen_lengths: Tensor, policy_rejected: Tensor, rejected_lengths: Tensor,
              *, alpha: float = 0.8) -> Tensor:
    """Mean over pairs of -log pi(y_w)/|y_w| + alpha * log pi(y_l)/|y_l|; [B] summed log-probs and token counts.

    Source: Xu et al. 2025, REDI, eq. 5 (each trace's log-likelihood divided by its own token count, lengths at
    least 1; alpha 0.8 by default, alpha 1 unstable at their learning rate).
    """
    alpha = check_number("alpha", alpha, 0, 1)
    _same_shape(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths, policy_rejected=policy_rejected,
                rejected_lengths=rejected_lengths)
    chosen = policy_chosen / chosen_lengths.to(policy_chosen.dtype).clamp(min=1)
    rejected = policy_rejected / rejected_lengths.to(policy_rejected.dtype).clamp(min=1)
    return (-chosen + alpha * rejected).mean()


def _forward_kl_sum(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """sum over masked positions of KL(softmax(teacher) || softmax(student)) (exact, over the whole vocabulary)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    student = torch.log_softmax(student_logits.to(dtype), dim=-1)
    teacher = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return torch.where(mask.bool(), per_token, 0.0).sum()


@register("dckd", kind="preference",
          formula="[w_c sum_{t in y_w} KL(p_T || p_S) + w_r sum_{t in y_l} KL(p_T || p_S)] / (N_w + N_l)",
          paper=_GAO + ", DCKD",
          params={"chosen_weight": Param(1.0, "float", low=0, doc="weight of the KL on the chosen response"),
                  "rejected_weight": Param(1.0, "float", low=0, doc="weight of the KL on the rejected response")},
          inputs="distribution")
def dckd_loss(student_chosen: Tensor, teacher_chosen: Tensor, chosen_mask: Tensor, student_rejected: Tensor,
              teacher_rejected: Tensor, rejected_mask: Tensor, *, chosen_weight: float = 1.0,
              rejected_weight: float = 1.0) -> Tensor:
    """Dual-constrained KD: forward KL from the aligned teacher to the student on the tokens of both responses,
    one mean over all their valid tokens. Logits [B, L, V] (position t predicts token t + 1), masks [B, L].

    Source: Gao et al. 2025 (DCKD): "two KL-divergence constraints from the aligned teacher to the unaligned
    student", on the preferred and the dispreferred response; their code takes the teacher's top-50 plus a rest
    bucket, here the KL is exact over the vocabulary; a token mean over both responses, no per-token weights.
    """
    chosen_weight = check_number("chosen_weight", chosen_weight, 0)
    rejected_weight = check_number("rejected_weight", rejected_weight, 0)
    _same_shape(student_chosen=student_chosen, teacher_chosen=teacher_chosen)
    _same_shape(student_rejected=student_rejected, teacher_rejected=teacher_rejected)
    count = (chosen_mask.bool().sum() + rejected_mask.bool().sum()).clamp(min=1)
    total = (chosen_weight * _forward_kl_sum(student_chosen, teacher_chosen, chosen_mask)
             + rejected_weight * _forward_kl_sum(student_rejected, teacher_rejected, rejected_mask))
    return total / count


@register("adpa", kind="preference",
          formula="-(1/N) sum_t sum_v p_S(v|s_t) A(s_t, v), A = log p_aligned(v|s_t) - log p_reference(v|s_t) "
                  "(optionally clipped to [-c, c])",
          paper=_GAO + ", ADPA",
          params={"advantage_clip": Param(None, "float", low=0, low_open=True,
                                          doc="clip the teacher's advantage to [-c, c] (None: no clip)")},
          inputs="distribution")
def adpa_loss(student_logits: Tensor, aligned_logits: Tensor, reference_logits: Tensor, mask: Tensor, *,
              advantage_clip: float | None = None) -> Tensor:
    """Advantage-guided distillation: minus the student's expected teacher advantage at each position, over the
    whole vocabulary, averaged over the valid positions. Logits [B, L, V] of the student, the aligned (DPO)
    teacher and that teacher's reference (its SFT model) on the same sequences (the student's samples); mask
    [B, L]. The gradient reaches every p_S(v|s_t), not only the sampled token's.

    Source: Gao et al. 2025 (ADPA), the advantage log pi_dpo - log pi_ref as a distribution-level reward. Their
    code keeps the aligned teacher's top 50 entries and clamps the advantage into (0, 1); here the advantage is
    the exact log-ratio over the vocabulary, clipped only if `advantage_clip` is given.
    """
    if advantage_clip is not None:
        advantage_clip = check_number("advantage_clip", advantage_clip, 0, low_open=True)
    _same_shape(student_logits=student_logits, aligned_logits=aligned_logits, reference_logits=reference_logits)
    dtype = compute_dtype(student_logits, aligned_logits, reference_logits)
    with torch.no_grad():
        advantage = (torch.log_softmax(aligned_logits.to(dtype), dim=-1)
                     - torch.log_softmax(reference_logits.to(dtype), dim=-1))
        if advantage_clip is not None:
            advantage = advantage.clamp(-advantage_clip, advantage_clip)
    expected = (torch.softmax(student_logits.to(dtype), dim=-1) * advantage).sum(-1)
    mask = mask.bool()
    return -torch.where(mask, expected, 0.0).sum() / mask.sum().clamp(min=1)
