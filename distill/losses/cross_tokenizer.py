"""Cross-tokenizer objectives: a teacher and a student whose vocabularies differ (kind "cross_token").

The alignment of the two token sequences is data preparation (distill/lm/cross_tokenizer/align.py): it gives
each token the id of its aligned chunk (-1: none), chunk c of the student covering the same text as chunk c of
the teacher. The losses here are pure functions of tensors:

- `uld`: Universal Logit Distillation (Boizard et al. 2024). Per aligned position, the L1 distance between the
  two next-token distributions sorted in decreasing order (the shorter zero-padded): the Wasserstein-1 distance
  between them as distributions over ranks, blind to which token is which. Positions are paired in order from
  the start of the completion, truncated to the shorter side (the ULD authors' code, TRL's GOLD `ULDLoss` with
  `use_extended_uld=False`).
- `gold_hybrid`: GOLD's hybrid (TRL `trl/experimental/gold`): on vocabulary entries whose strings match on both
  sides, the generalized JSD of the matched sub-vectors (TRL's convention: not renormalised); ULD on the
  entries left over; weighted by the matched share of the teacher's vocabulary unless weights are given. The
  rows are per aligned chunk: each side's distribution at the chunk's last token times the probability of the
  chunk's earlier tokens (the chain rule, TRL's "bayesian" merge; `chunk_rows`).
- `alm`: Approximate Likelihood Matching (Minixhofer et al. 2025): each chunk's likelihood on both sides, seen
  as the probability of a binary outcome and sharpened by a temperature, compared by a binary f-divergence.

`chunk_logprobs` and `chunk_rows` turn per-token values into per-chunk ones (scatter over chunk ids).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register

__all__ = ["alm", "chunk_logprobs", "chunk_rows", "gold_hybrid", "sorted_l1", "uld"]


def sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per row: sum_i |sort_desc(p_S)_i - sort_desc(p_T)_i|, the shorter vector zero-padded. [N, V_S], [N, V_T] -> [N]."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student = torch.nn.functional.pad(student_probs.sort(-1, descending=True).values,
                                      (0, width - student_probs.shape[-1]))
    teacher = torch.nn.functional.pad(teacher_probs.sort(-1, descending=True).values,
                                      (0, width - teacher_probs.shape[-1]))
    return (student - teacher).abs().sum(-1)


def _paired_rows(student_mask: Tensor, teacher_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the k-th valid row of each side in each sample, k < min(count_S, count_T)."""
    student_rows, teacher_rows = [], []
    for b in range(student_mask.shape[0]):
        s = student_mask[b].nonzero().squeeze(-1)
        t = teacher_mask[b].nonzero().squeeze(-1)
        n = min(len(s), len(t))
        student_rows.append(b * student_mask.shape[1] + s[:n])
        teacher_rows.append(b * teacher_mask.shape[1] + t[:n])
    return torch.cat(student_rows), torch.cat(teacher_rows)


@register("uld", kind="cross_token", formula="sum_i |sort(p_S)_i - sort(p_T)_i| per aligned position (zero-padded "
                                             "to the larger vocabulary), positions paired in order",
          paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss "
                "for LLMs",
          params={"teacher_temperature": Param(1.0, "float", low=0, low_open=True,
                                               doc="divides the teacher's logits (objective.temperature: the "
                                                   "student's)")})
def uld(student_logits: Tensor, teacher_logits: Tensor, student_mask: Tensor, teacher_mask: Tensor, *,
        temperature: float = 1.0, teacher_temperature: float = 1.0,
        num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """ULD: sum over paired positions of ||sort_desc softmax(s / T_S) - sort_desc softmax(t / T_T)||_1, divided by
    `num_valid_tokens` (default: the number of pairs). Each in [0, 2].

    student_logits [B, L_S, V_S] and teacher_logits [B, L_T, V_T] are already shifted (row t predicts token t + 1);
    `student_mask` [B, L_S] and `teacher_mask` [B, L_T] mark the completion rows. Within a sample the k-th marked
    row of the student is paired with the k-th marked row of the teacher, for k below the smaller count.
    Source: Boizard et al. 2024 (their code pairs answer positions from the start and truncates to the shorter);
    TRL GOLD's `ULDLoss` without extended alignment."""
    check_number("temperature", temperature, 0, None, low_open=True)
    check_number("teacher_temperature", teacher_temperature, 0, None, low_open=True)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_rows, teacher_rows = _paired_rows(student_mask.bool(), teacher_mask.bool())
    student = student_logits.reshape(-1, student_logits.shape[-1])[student_rows].to(dtype)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[teacher_rows].to(dtype)
    per_position = sorted_l1(torch.softmax(student / temperature, -1), torch.softmax(teacher / teacher_temperature, -1))
    denominator = per_position.numel() if num_valid_tokens is None else num_valid_tokens
    return per_position.sum() / torch.as_tensor(denominator, dtype=dtype, device=per_position.device).clamp(min=1)


def chunk_logprobs(token_logprobs: Tensor, chunk: Tensor, num_chunks: int) -> Tensor:
    """Per chunk, the sum of its tokens' log-probabilities: token_logprobs [B, L] (of the token at each position),
    chunk [B, L] (chunk ids, -1 for none) -> [B, num_chunks]."""
    batch = token_logprobs.shape[0]
    valid = chunk >= 0
    index = (torch.arange(batch, device=chunk.device)[:, None] * num_chunks + chunk.clamp(min=0))[valid]
    out = torch.zeros(batch * num_chunks, dtype=token_logprobs.dtype, device=token_logprobs.device)
    return out.index_add(0, index, token_logprobs[valid]).reshape(batch, num_chunks)


def chunk_rows(logprobs: Tensor, token_logprobs: Tensor, chunk: Tensor, num_chunks: int) -> tuple[Tensor, Tensor]:
    """Per chunk, the log of the chain-rule merged row: the distribution at its last token's position plus the
    log-probability of its earlier tokens (TRL GOLD's "bayesian" merge), and which chunks exist.

    logprobs [B, L, V]: the log-distribution predicting the token at each position (already shifted: row t is the
    prediction of token t); token_logprobs [B, L]: the log-probability of the token at each position; chunk [B, L].
    Returns rows [B, num_chunks, V] and present [B, num_chunks] (bool)."""
    batch, length, vocab = logprobs.shape
    positions = torch.arange(length, device=chunk.device).expand(batch, length)
    last = torch.full((batch, num_chunks), -1, dtype=torch.long, device=chunk.device)
    valid = chunk >= 0
    flat = (torch.arange(batch, device=chunk.device)[:, None] * num_chunks + chunk.clamp(min=0))[valid]
    last = last.reshape(-1).scatter_reduce(0, flat, positions[valid], reduce="amax").reshape(batch, num_chunks)
    present = last >= 0
    total = chunk_logprobs(token_logprobs, chunk, num_chunks)
    at_last = token_logprobs.gather(1, last.clamp(min=0))
    rows = logprobs.gather(1, last.clamp(min=0)[..., None].expand(batch, num_chunks, vocab))
    return rows + (total - at_last)[..., None], present


@register("gold_hybrid", kind="cross_token", aliases=("gold",),
          formula="w_m JSD_beta(p_T[matched], p_S[matched]) + w_u ULD(p_T[unmatched], p_S[unmatched]) per aligned "
                  "chunk; w_m = matched / V_T unless given",
          paper="TRL GOLD (General Online Logit Distillation), trl/experimental/gold; Boizard et al. 2024 for ULD",
          params={"beta": Param(0.5, "float", low=0, high=1, doc="GKD's JSD mixture weight of the teacher (0: "
                                                                 "forward KL, 1: reverse KL) on matched entries"),
                  "matched_weight": Param(-1.0, "float", low=-1, high=1, doc="weight of the matched part; -1: "
                                                                             "the matched share of the teacher's "
                                                                             "vocabulary (TRL's default)")})
def gold_hybrid(student_rows: Tensor, teacher_rows: Tensor, student_matched: Tensor, teacher_matched: Tensor, *,
                beta: float = 0.5, matched_weight: float = -1.0,
                num_valid_chunks: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GOLD's hybrid loss over aligned rows, as TRL computes it: (total, matched part, unmatched part).

    student_rows [N, V_S] and teacher_rows [N, V_T] are probabilities (e.g. `chunk_rows(...).exp()`);
    `student_matched` [M] and `teacher_matched` [M] index the vocabulary entries that are the same string on both
    sides, pairwise. Matched: GKD's generalized JSD with M = beta p_T + (1 - beta) p_S on the matched sub-vectors
    (not renormalised; clamped at 1e-8 inside the logs; beta 0 is KL(T||S), 1 is KL(S||T)), summed over entries.
    Unmatched: ULD (`sorted_l1`) of the complements. Both summed over rows and divided by `num_valid_chunks`
    (default N). total = w_m matched + (1 - w_m) unmatched, w_m = M / V_T when `matched_weight` is -1."""
    check_number("beta", beta, 0, 1)
    check_number("matched_weight", matched_weight, -1, 1)
    dtype = compute_dtype(student_rows, teacher_rows)
    student_rows, teacher_rows = student_rows.to(dtype), teacher_rows.to(dtype)
    denominator = torch.as_tensor(student_rows.shape[0] if num_valid_chunks is None else num_valid_chunks,
                                  dtype=dtype, device=student_rows.device).clamp(min=1)
    weight = student_matched.numel() / teacher_rows.shape[-1] if matched_weight == -1 else matched_weight
    p_s, p_t = student_rows[:, student_matched], teacher_rows[:, teacher_matched]
    if student_matched.numel():
        floor = 1e-8
        if beta == 0:
            matched = (p_t * (p_t.clamp(min=floor).log() - p_s.clamp(min=floor).log())).sum()
        elif beta == 1:
            matched = (p_s * (p_s.clamp(min=floor).log() - p_t.clamp(min=floor).log())).sum()
        else:
            mixture = (beta * p_t + (1 - beta) * p_s).clamp(min=floor).log()
            matched = (beta * (p_t * (p_t.clamp(min=floor).log() - mixture))
                       + (1 - beta) * (p_s * (p_s.clamp(min=floor).log() - mixture))).sum()
    else:
        matched = student_rows.sum() * 0
    keep_s = torch.ones(student_rows.shape[-1], dtype=torch.bool, device=student_rows.device)
    keep_t = torch.ones(teacher_rows.shape[-1], dtype=torch.bool, device=teacher_rows.device)
    keep_s[student_matched], keep_t[teacher_matched] = False, False
    unmatched = sorted_l1(student_rows[:, keep_s], teacher_rows[:, keep_t]).sum()
    matched, unmatched = matched / denominator, unmatched / denominator
    return weight * matched + (1 - weight) * unmatched, matched, unmatched


@register("alm", kind="cross_token",
          formula="D_f(Bern(p_T(c)^(1/tau)) || Bern(p_S(c)^(1/tau))) per aligned chunk c, p(c) = exp(min(0, sum of "
                  "the chunk's token log-probs))",
          paper="Minixhofer, Vulic & Ponti 2025, Cross-Tokenizer Distillation via Approximate Likelihood Matching",
          params={"tau": Param(100.0, "float", low=0, low_open=True, doc="outcome temperature: chunk likelihoods "
                                                                         "are raised to 1/tau (tokenkit: 100)"),
                  "debias": Param(False, "bool", doc="add each chunk's probability that the next token starts a new "
                                                     "unit (whitespace or special), on each side (tokenkit's "
                                                     "append_space)"),
                  "merge_threshold": Param(0.0, "float", low=0, high=1, doc="merge consecutive chunks until the "
                                           "teacher's probability of a unit boundary after one exceeds this "
                                           "(tokenkit's merge_by_space_prob, 0.1); 0: no merging"),
                  "divergence": Param("binary_kl", "str", choices=("binary_kl", "binary_ce", "binary_reverse_kl"),
                                      doc="the binary f-divergence (binary_ce: tokenkit's value, binary_kl plus the "
                                          "teacher's binary entropy; the same gradient)")})
def alm(student_chunk_logprobs: Tensor, teacher_chunk_logprobs: Tensor, mask: Tensor | None = None, *,
        tau: float = 100.0, divergence: str = "binary_kl", epsilon: float = 1e-6,
        num_valid_chunks: int | Tensor | None = None, debias: bool = False, merge_threshold: float = 0.0,
        student_boundary: Tensor | None = None, teacher_boundary: Tensor | None = None) -> Tensor:
    """ALM: with L = min(0, chunk log-likelihood) and y = exp(L / tau - epsilon) the probability of the binary
    outcome "the chunk comes next" on each side, the mean over valid chunks of
      binary_kl:         y_T log(y_T / y_S) + (1 - y_T) log((1 - y_T) / (1 - y_S))
      binary_reverse_kl: the same with the sides swapped
      binary_ce:         -(y_T log y_S + (1 - y_T) log(1 - y_S))  (= binary_kl + H(y_T))
    `epsilon` keeps y below 1 so that log(1 - y) stays finite. Inputs [B, K] of chunk log-likelihoods (sums of
    token log-probabilities, `chunk_logprobs`) in order along K, `mask` [B, K] the chunks to use.
    With `student_boundary` / `teacher_boundary` [B, K] (each side's log-probability that the token after the
    chunk starts a new unit): `merge_threshold` > 0 first merges consecutive chunks into groups closed by a chunk
    whose teacher boundary probability exceeds it (a group's likelihood is the sum of its chunks', its boundary its
    last chunk's; a group is used if all its chunks are); `debias` then adds each side's boundary log-probability to
    the likelihood (the chunk followed by a boundary, not a chunk that continues into a longer word).
    Source: Minixhofer et al. 2025 and tokenkit (`compute_alm_loss`: binary cross-entropy, tau = 100; its
    `append_space` and `merge_by_space_prob` for debias and merging)."""
    check_number("tau", tau, 0, None, low_open=True)
    check_number("merge_threshold", merge_threshold, 0, 1)
    if (debias or merge_threshold > 0) and (student_boundary is None or teacher_boundary is None):
        raise ValueError("debias and merge_threshold need student_boundary and teacher_boundary")
    if merge_threshold > 0:
        student_chunk_logprobs, teacher_chunk_logprobs, mask, student_boundary, teacher_boundary = _merge(
            student_chunk_logprobs, teacher_chunk_logprobs, mask, student_boundary, teacher_boundary, merge_threshold)
    if debias:
        student_chunk_logprobs = student_chunk_logprobs + student_boundary
        teacher_chunk_logprobs = teacher_chunk_logprobs + teacher_boundary
    if divergence not in ("binary_kl", "binary_ce", "binary_reverse_kl"):
        raise ValueError(f"divergence must be binary_kl, binary_ce or binary_reverse_kl, got {divergence!r}")
    dtype = compute_dtype(student_chunk_logprobs, teacher_chunk_logprobs)
    log_s = student_chunk_logprobs.to(dtype).clamp(max=0) / tau - epsilon
    log_t = teacher_chunk_logprobs.to(dtype).clamp(max=0) / tau - epsilon
    log1m_s, log1m_t = _log1mexp(log_s), _log1mexp(log_t)
    y_s, y_t = log_s.exp(), log_t.exp()
    if divergence == "binary_kl":
        per_chunk = y_t * (log_t - log_s) + (1 - y_t) * (log1m_t - log1m_s)
    elif divergence == "binary_reverse_kl":
        per_chunk = y_s * (log_s - log_t) + (1 - y_s) * (log1m_s - log1m_t)
    else:
        per_chunk = -(y_t * log_s + (1 - y_t) * log1m_s)
    if mask is not None:
        per_chunk = torch.where(mask.bool(), per_chunk, 0.0)
    count = mask.sum() if mask is not None else per_chunk.numel()
    denominator = count if num_valid_chunks is None else num_valid_chunks
    return per_chunk.sum() / torch.as_tensor(denominator, dtype=dtype, device=per_chunk.device).clamp(min=1)


def _merge(student, teacher, mask, student_boundary, teacher_boundary, threshold):
    """Chunks [B, K] merged into groups, each closed by a chunk whose teacher boundary probability exceeds
    `threshold` (or by the row's last chunk): sums of likelihoods, the closing chunk's boundaries, all-valid masks."""
    batch, count = student.shape
    closes = teacher_boundary.exp() > threshold
    group = torch.cumsum(closes.long(), 1) - closes.long()  # chunks up to and including a closing one share a group
    index = (torch.arange(batch, device=student.device)[:, None] * count + group).reshape(-1)

    def total(values):
        return torch.zeros(batch * count, dtype=values.dtype, device=values.device).index_add(
            0, index, values.reshape(-1)).reshape(batch, count)

    valid = mask.bool() if mask is not None else torch.ones_like(student, dtype=torch.bool)
    members = total(torch.ones_like(student))
    all_valid = total(valid.to(student.dtype)) == members
    # the group's boundary: its last chunk's (the largest index in the group)
    last = torch.full((batch * count,), -1, dtype=torch.long, device=student.device).scatter_reduce(
        0, index, torch.arange(count, device=student.device).repeat(batch), reduce="amax").reshape(batch, count)
    present = (members > 0) & all_valid
    pick = last.clamp(min=0)
    return (total(student), total(teacher), present, student_boundary.gather(1, pick),
            teacher_boundary.gather(1, pick))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
