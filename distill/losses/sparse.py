"""A sparse teacher (its top-k log-probabilities, e.g. from `distill cache`) against a full student.

Two ways to compare them, chosen by the recipe (`regime.sparse`):

- `tail` (default): a distribution over k + 1 outcomes, the teacher's top-k tokens and one
  bucket for everything else. The teacher's bucket holds its stored tail mass
  log(1 - sum_topk p_T); the student's holds log(1 - sum_topk p_S). Both are proper
  distributions, so every divergence of the registry applies unchanged to the [..., k + 1]
  "logits" below, and nothing of the teacher's distribution is dropped.
- `renormalize`: the teacher is zero outside its top-k (its top-k mass rescaled to 1); the
  student keeps its full vocabulary. `dense_teacher_logits` builds that [..., V] tensor.

Temperature: student columns are T * log p_S^T (p_S^T = softmax(z_S / T)), so that the
divergence's own division by T gives back exactly log p_S^T over the k + 1 outcomes. The
teacher's columns are its stored log-probabilities at T = 1; the divergence's softmax(. / T)
over them is exact among the top-k entries and approximate for the bucket (the cache does not
know how the tail mass would redistribute at another temperature).
"""
from __future__ import annotations

import torch
from torch import Tensor

SPARSE_MODES = ("tail", "renormalize")


def student_topk_tail_logits(student_logits: Tensor, topk_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """[..., k + 1]: T * log p_S^T at the teacher's top-k ids, then T * log of the student's mass
    outside them. Differentiable with respect to student_logits."""
    scaled = student_logits / temperature if temperature != 1.0 else student_logits
    logprobs = torch.log_softmax(scaled.float() if scaled.dtype in (torch.float16, torch.bfloat16) else scaled, -1)
    top = logprobs.gather(-1, topk_ids)
    rest = logprobs.scatter(-1, topk_ids, float("-inf")).logsumexp(-1, keepdim=True)
    collapsed = torch.cat([top, rest], dim=-1)
    return collapsed * temperature if temperature != 1.0 else collapsed


def teacher_topk_tail_logits(topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    """[..., k + 1]: the teacher's stored top-k log-probabilities and its tail log-mass."""
    return torch.cat([topk_logprobs, tail_logmass.unsqueeze(-1).to(topk_logprobs.dtype)], dim=-1)


def dense_teacher_logits(topk_ids: Tensor, topk_logprobs: Tensor, vocab_size: int) -> Tensor:
    """[..., V]: the top-k log-probabilities in place, -inf elsewhere (softmax renormalises them)."""
    dense = torch.full((*topk_ids.shape[:-1], vocab_size), float("-inf"), dtype=topk_logprobs.dtype,
                       device=topk_logprobs.device)
    return dense.scatter(-1, topk_ids, topk_logprobs)
