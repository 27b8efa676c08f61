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

Options (`opd_loss`; recipe section regime.opd): Schulman's k1 / k2 / k3 estimators for the token reward
(KDRL compares them), reward clipping, a batch-mean baseline, per-sample weights from a quality gate on the
teacher's score of each sample (KEPO's idea), and the PPO-clipped importance ratio for samples an older
policy drew (stale or offline rollouts).
"""
from __future__ import annotations

import torch
from torch import Tensor


ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(student_logprobs: Tensor, teacher_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Schulman's estimators of KL(p_S || p_T) from a token sampled from p_S, with log r = lp_T - lp_S:
    k1 = -log r (unbiased, any sign), k2 = (log r)^2 / 2 (biased, >= 0), k3 = (r - 1) - log r (unbiased, >= 0).

    Source: J. Schulman 2020, "Approximating KL Divergence"; compared as OPD rewards by KDRL (Xu et al. 2025,
    arXiv 2506.02208). As a REINFORCE reward only k1 gives the reverse KL's exact gradient (k2's gradient
    as a loss equals it); k2 and k3 rewards are lower-variance, biased alternatives.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    log_ratio = teacher_logprobs - student_logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio


def opd_token_rewards(student_logprobs: Tensor, teacher_logprobs: Tensor, reference_logprobs: Tensor | None,
                      scale: float = 1.0, estimator: str = "k1") -> Tensor:
    """r_t = -k(lp_S, lp_T'), detached, with the (extrapolated) teacher lp_T' = lp_ref + scale (lp_T - lp_ref);
    for k1: scale (lp_T - lp_ref) - (lp_S - lp_ref). The reference may be None when scale = 1 (it cancels)."""
    student = student_logprobs.detach()
    if scale != 1.0:
        if reference_logprobs is None:
            raise ValueError("scale != 1 needs reference log-probabilities")
        teacher_logprobs = reference_logprobs + scale * (teacher_logprobs - reference_logprobs)
    return -kl_estimate(student, teacher_logprobs, estimator)


def quality_weights(teacher_logprobs: Tensor, mask: Tensor, threshold: float | None, gated_weight: float = 0.0) -> Tensor:
    """[B] weights of the samples: 1 where the teacher's mean log-prob of the sample's tokens is at least
    `threshold`, `gated_weight` below it (0: dropped); all 1 without a threshold. A quality gate in the spirit of
    KEPO (Yang et al. 2026, arXiv 2602.00400: distil only on good trajectories), the teacher being the judge."""
    mask = mask.bool()
    if threshold is None:
        return torch.ones(mask.shape[0], dtype=teacher_logprobs.dtype, device=teacher_logprobs.device)
    quality = torch.where(mask, teacher_logprobs, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    return torch.where(quality >= threshold, 1.0, float(gated_weight)).to(teacher_logprobs.dtype)


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
             reward_weight: float = 0.0, num_valid_tokens: int | Tensor | None = None, estimator: str = "k1",
             reward_clip: float | None = None, baseline: str = "none", sample_weights: Tensor | None = None,
             behavior_logprobs: Tensor | None = None, ratio_clip: float | None = None) -> tuple[Tensor, dict]:
    """Policy-gradient loss of on-policy distillation over sampled tokens.

    student_logprobs [B, L] (with grad), teacher_logprobs / reference_logprobs [B, L]: log-probs
    of the sampled tokens; mask [B, L] marks completion tokens; sequence_advantages [B].
    Options (each off by default, which is plain REINFORCE with the k1 reward):
      estimator     the per-token reward -k(lp_S, lp_T) (`kl_estimate`: k1 | k2 | k3);
      reward_clip   clip each token's reward to [-c, c];
      baseline      "batch": subtract the mean token reward of the valid tokens, weighted by sample_weights
                    (variance reduction; a gated sample's tokens do not shift the others');
      sample_weights [B] multiply each sample's terms (a quality gate: `quality_weights`);
      behavior_logprobs, ratio_clip   samples drawn by an older policy: the PPO surrogate
                    -min(rho A, clip(rho, 1 - e, 1 + e) A) with rho = exp(lp_S - lp_behavior) (fresh samples:
                    rho = 1, the same gradient as REINFORCE).
    Returns (loss, diagnostics: reverse_kl (mean lp_S - lp_T), advantage (mean), reward_std, kept (the share of
    samples with a weight above 0), clipped (the share of tokens whose ratio was clipped))."""
    mask = mask.bool()
    rewards = opd_token_rewards(student_logprobs, teacher_logprobs, reference_logprobs, scale, estimator)
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    valid = mask.sum().clamp(min=1)
    weights = torch.ones_like(rewards) if sample_weights is None else sample_weights.to(rewards.dtype)[:, None]
    if baseline == "batch":  # the mean over the tokens that count, as weighted (a gated sample's do not)
        kept = torch.where(mask, weights, 0.0)
        rewards = rewards - (kept * rewards).sum() / kept.sum().clamp(min=1e-12)
    elif baseline != "none":
        raise ValueError(f"baseline must be none or batch, got {baseline!r}")
    advantages = rewards
    if sequence_advantages is not None and reward_weight:
        advantages = advantages + reward_weight * sequence_advantages.to(rewards.dtype)[:, None]
    count = num_valid_tokens if num_valid_tokens is not None else valid
    clipped = torch.zeros((), dtype=advantages.dtype)
    if behavior_logprobs is None:
        surrogate = advantages * student_logprobs
    else:
        ratio = torch.exp(student_logprobs - behavior_logprobs.detach())
        surrogate = ratio * advantages
        if ratio_clip is not None:
            bounded = ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * advantages
            surrogate = torch.minimum(surrogate, bounded)
            with torch.no_grad():
                clipped = torch.where(mask, (bounded < ratio * advantages).to(advantages.dtype), 0.0).sum() / valid
    loss = -(torch.where(mask, weights * surrogate, 0.0)).sum() / count
    with torch.no_grad():
        token_rewards = rewards[mask]
        diagnostics = {"reverse_kl": float(torch.where(mask, student_logprobs - teacher_logprobs, 0.0).sum() / count),
                       "advantage": float(torch.where(mask, advantages, 0.0).sum() / count),
                       "reward_std": float(token_rewards.std()) if token_rewards.numel() > 1 else 0.0,
                       "kept": float((weights[:, 0] > 0).float().mean()) if weights.numel() else 1.0,
                       "clipped": float(clipped)}
    return loss, diagnostics
