"""On-policy distillation as reinforcement learning (OPD): the student's own samples, a per-token
reward from the teacher, and a policy-gradient loss.

For a sampled completion y and each of its tokens t (log-probabilities of the sampled token):

    r_t = scale * (log p_T(y_t) - log p_ref(y_t)) - (log p_S(y_t) - log p_ref(y_t))

With scale = 1 the reference cancels and r_t = log p_T(y_t) - log p_S(y_t): minus the per-token
reverse KL, the standard on-policy distillation reward (Agarwal et al. 2024, GKD; "on-policy
distillation" as in Lu & Thinking Machines 2025). scale > 1 extrapolates the teacher's advantage
over the reference (G-OPD / ExOPD, reward extrapolation). An optional verifiable sequence reward
R (e.g. a correct answer) is added to every token of its sequence with `reward_weight`, as in
KD + RL (KDRL); with several samples per prompt it is centred on the group mean (GRPO-style).

The loss is REINFORCE with per-token advantages (no discounting: each token's reward is its own),
normalised by the valid-token count:

    loss = - sum_t stopgrad(r_t + reward_weight * A_seq) * log p_S(y_t) / N
"""
from __future__ import annotations

import torch
from torch import Tensor


def opd_token_rewards(student_logprobs: Tensor, teacher_logprobs: Tensor, reference_logprobs: Tensor | None,
                      scale: float = 1.0) -> Tensor:
    """r_t = scale (lp_T - lp_ref) - (lp_S - lp_ref), detached; reference may be None when scale = 1."""
    student = student_logprobs.detach()
    if scale == 1.0 or reference_logprobs is None:
        if scale != 1.0:
            raise ValueError("scale != 1 needs reference log-probabilities")
        return teacher_logprobs - student
    return scale * (teacher_logprobs - reference_logprobs) - (student - reference_logprobs)


def group_advantages(sequence_rewards: Tensor, group_size: int) -> Tensor:
    """Sequence rewards [B] minus the mean of their group of `group_size` consecutive samples
    (unchanged when group_size is 1)."""
    if group_size == 1:
        return sequence_rewards
    if sequence_rewards.numel() % group_size:
        raise ValueError(f"{sequence_rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = sequence_rewards.view(-1, group_size)
    return (grouped - grouped.mean(-1, keepdim=True)).view(-1)


def opd_loss(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *,
             reference_logprobs: Tensor | None = None, scale: float = 1.0, sequence_advantages: Tensor | None = None,
             reward_weight: float = 0.0, num_valid_tokens: int | Tensor | None = None) -> tuple[Tensor, dict]:
    """Policy-gradient loss of on-policy distillation over sampled tokens.

    student_logprobs [B, L] (with grad), teacher_logprobs / reference_logprobs [B, L]: log-probs
    of the sampled tokens; mask [B, L] marks completion tokens; sequence_advantages [B].
    Returns (loss, {"reverse_kl": mean lp_S - lp_T over tokens, "advantage": mean advantage})."""
    rewards = opd_token_rewards(student_logprobs, teacher_logprobs, reference_logprobs, scale)
    advantages = rewards
    if sequence_advantages is not None and reward_weight:
        advantages = advantages + reward_weight * sequence_advantages.to(rewards.dtype)[:, None]
    mask = mask.bool()
    count = num_valid_tokens if num_valid_tokens is not None else mask.sum().clamp(min=1)
    loss = -(torch.where(mask, advantages * student_logprobs, 0.0)).sum() / count
    with torch.no_grad():
        diagnostics = {"reverse_kl": float(torch.where(mask, student_logprobs - teacher_logprobs, 0.0).sum() / count),
                       "advantage": float(torch.where(mask, advantages, 0.0).sum() / count)}
    return loss, diagnostics
