"""Chunked fused-linear distillation losses: never hold full-vocabulary logits for all tokens.

From the student's final hidden states and its `lm_head` (weight, bias), and the teacher as
hidden states + head, as logits, or as a sparse top-k distribution, compute any token-separable
divergence (+ optional hard-label CE) chunk by chunk over the valid tokens. Each chunk's
logits are built, its loss and gradients computed and the logits freed before the next
chunk, so at most one chunk of logits exists at a time. Gradients are computed inside the
forward (as Liger-Kernel's chunked losses do) and returned, scaled, by the backward.

Exactness: every divergence is sum(per-token) / num_valid_tokens, so the sum of the chunks'
losses, each normalised by the total count, is the full loss; gradients equal the naive path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.closed_form import closed_form_for
from distill.losses.logits import IGNORE_INDEX, cross_entropy
from distill.losses.registry import get_spec
from distill.losses.sparse import student_topk_tail_logits, teacher_topk_tail_logits

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
# Full-vocabulary float32 tensors alive per token while a chunk is processed: student logits,
# log-softmax, probabilities and their gradients, and the same for the teacher (measured ~8-10).
LOGIT_COPIES_PER_TOKEN = 10


@dataclass
class TeacherSignal:
    """The teacher, in one of three forms (exactly one is set):
    - `hidden` [N, H] + `weight` [V, H] (+ `bias` [V]): logits are made per chunk;
    - `logits` [N, V]: already materialised (e.g. a live teacher without a fused head);
    - `topk_ids` [N, k] + `topk_logprobs` [N, k]: a sparse distribution; entries outside the
      top-k get zero probability (the top-k mass is renormalised by the softmax);
    - the same + `tail_logmass` [N]: top-k + one bucket for the rest: teacher and student are
      compared over k + 1 outcomes (`distill/losses/sparse.py`)."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    tail_logmass: Tensor | None = None

    def __post_init__(self):
        forms = [self.hidden is not None, self.logits is not None, self.topk_ids is not None]
        if sum(forms) != 1:
            raise ValueError("give the teacher as exactly one of hidden+weight, logits, or topk_ids+topk_logprobs")
        if self.hidden is not None and self.weight is None:
            raise ValueError("teacher hidden states need the teacher's lm_head weight")
        if self.topk_ids is not None and self.topk_logprobs is None:
            raise ValueError("topk_ids need topk_logprobs")
        if self.tail_logmass is not None and self.topk_ids is None:
            raise ValueError("tail_logmass goes with topk_ids + topk_logprobs")

    def token_rows(self, rows: Tensor, num_tokens: int) -> "TeacherSignal":
        """The signal flattened to [tokens, ...] and restricted to token `rows`."""
        def take(name):
            value = getattr(self, name)
            if value is None:
                return None
            flat = value.reshape(-1) if name == "tail_logmass" else value.reshape(-1, value.shape[-1])
            if flat.shape[0] != num_tokens:
                raise ValueError(f"teacher {name} has {flat.shape[0]} token rows, the student {num_tokens}")
            return flat[rows]
        return TeacherSignal(hidden=take("hidden"), weight=self.weight, bias=self.bias, logits=take("logits"),
                             topk_ids=take("topk_ids"), topk_logprobs=take("topk_logprobs"),
                             tail_logmass=take("tail_logmass"))

    def write_chunk_logits(self, out: Tensor, start: int, end: int) -> Tensor:
        """out <- teacher logits of rows start:end over the first out.shape[-1] vocabulary entries."""
        vocab_size = out.shape[-1]
        if self.logits is not None:
            return out.copy_(self.logits[start:end, :vocab_size])
        if self.hidden is not None:
            return _linear_into(out, self.hidden[start:end], self.weight[:vocab_size],
                                self.bias[:vocab_size] if self.bias is not None else None)
        return out.fill_(float("-inf")).scatter_(1, self.topk_ids[start:end],
                                                  self.topk_logprobs[start:end].to(out.dtype))


def chunk_size_for(vocab_size: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                   copies_per_token: int = LOGIT_COPIES_PER_TOKEN) -> int:
    """Tokens per chunk so that a chunk's full-vocabulary float32 tensors fit the budget."""
    return max(1, memory_budget_bytes // (vocab_size * 4 * copies_per_token))


class _Workspace:
    """[chunk, V] buffers in the compute dtype, allocated once per loss call and reused by every
    chunk (a fresh allocation per chunk costs page faults as expensive as the arithmetic)."""

    def __init__(self, rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab_size, self.dtype, self.device = rows, vocab_size, dtype, device
        self.buffers: list[Tensor] = []

    def take(self, count: int, rows: int) -> list[Tensor]:
        while len(self.buffers) < count:
            self.buffers.append(torch.empty(self.rows, self.vocab_size, dtype=self.dtype, device=self.device))
        return [buffer[:rows] for buffer in self.buffers[:count]]


def _linear_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out <- hidden @ weight^T + bias (computed in the inputs' dtype, stored in out's)."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        torch.mm(hidden, weight.T, out=out)
        return out.add_(bias) if bias is not None else out
    logits = hidden @ weight.T
    return out.copy_(logits + bias if bias is not None else logits)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, chunk_loss, closed_form, num_valid_tokens, chunk_size,
                vocab_size):
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        workspace = _Workspace(min(chunk_size, hidden.shape[0]), vocab_size, compute_dtype, hidden.device)
        head_weight = weight.detach()[:vocab_size]
        head_bias = bias.detach()[:vocab_size] if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end].detach()
            with torch.no_grad():
                if closed_form is not None:  # value and logit gradient in closed form, in place
                    chunk_fn, num_buffers = closed_form
                    buffers = workspace.take(num_buffers, end - start)
                    _linear_into(buffers[0], hidden_chunk, head_weight, head_bias)
                    if teacher is not None:
                        teacher.write_chunk_logits(buffers[1], start, end)
                    terms, grad_logits = chunk_fn(buffers, labels[start:end], float(num_valid_tokens))
                    chunk_value = chunk_loss.combine(terms, num_valid_tokens)
                else:  # autograd through the divergence, from the logits only
                    student_buffer, teacher_buffer = workspace.take(2, end - start)
                    logits = _linear_into(student_buffer, hidden_chunk, head_weight, head_bias)
                    bucketed = teacher is not None and teacher.tail_logmass is not None
                    if bucketed:  # top-k + tail: k + 1 outcomes
                        teacher_logits = teacher_topk_tail_logits(teacher.topk_logprobs[start:end],
                                                                  teacher.tail_logmass[start:end])
                    else:
                        teacher_logits = (teacher.write_chunk_logits(teacher_buffer, start, end)
                                          if teacher is not None else None)
                    with torch.enable_grad():
                        logits = logits.detach().requires_grad_()
                        kd_logits = logits
                        if bucketed:
                            kd_logits = student_topk_tail_logits(logits, teacher.topk_ids[start:end],
                                                                 chunk_loss.temperature)
                        chunk_value = chunk_loss(logits, teacher_logits, labels[start:end], num_valid_tokens,
                                                 kd_logits)
                        grad_logits, = torch.autograd.grad(chunk_value, [logits])
                    chunk_value = chunk_value.detach()
                # The head's matmuls, shared by both paths: accumulate in place (no [V, H] temporaries).
                grad_logits = grad_logits.to(hidden.dtype)
                torch.mm(grad_logits, head_weight, out=grad_hidden[start:end])
                grad_weight[:vocab_size].addmm_(grad_logits.T, hidden_chunk)
                if grad_bias is not None:
                    grad_bias[:vocab_size] += grad_logits.sum(0)
            total += chunk_value
        ctx.save_for_backward(grad_hidden, grad_weight, *([grad_bias] if grad_bias is not None else []))
        ctx.has_bias = grad_bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grad_hidden, grad_weight = saved[0] * grad_output, saved[1] * grad_output
        grad_bias = saved[2] * grad_output if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def fused_linear_distillation(student_hidden: Tensor, student_weight: Tensor, teacher: TeacherSignal | None, *,
                              labels: Tensor | None = None, mask: Tensor | None = None, loss: str = "forward_kl",
                              kd_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                              student_bias: Tensor | None = None, vocab_size: int | None = None,
                              num_valid_tokens: int | Tensor | None = None, chunk_size: int | None = None,
                              memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, parts: dict | None = None,
                              **params) -> Tensor:
    """kd_weight * divergence(student, teacher) + ce_weight * CE(student, labels), chunked.

    student_hidden [..., H] and the head weight [V, H] (+ bias [V]) define the student logits
    h @ W^T + b; tokens count where `mask` is True and (if `labels` given) the label is not -100.
    Only valid tokens are computed at all. `vocab_size` compares over the first entries only
    (same-family models with padded embedding rows). The result and its gradients equal
    `kd_weight * get_spec(loss, kind="token").fn(logits, teacher_logits, mask, ...) + ce_weight * CE(...)`
    on the materialised logits. A `parts` dict, if given, receives the unweighted `kd` and `ce`
    values (for logging: one pass computes both)."""
    spec = get_spec(loss, kind="token") if kd_weight > 0 else None
    divergence = spec.fn if spec is not None else None
    if spec is not None and not spec.token_separable:
        raise ValueError(f"loss `{loss}` couples tokens, so it cannot be computed chunk by chunk; "
                         "use the plain (unfused) path")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if divergence is not None and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher signal")
    hidden_size = student_hidden.shape[-1]
    valid = torch.ones(student_hidden.shape[:-1], dtype=torch.bool, device=student_hidden.device)
    if mask is not None:
        valid &= mask.bool()
    if labels is not None:
        valid &= labels != IGNORE_INDEX
    flat_valid = valid.reshape(-1)
    rows = flat_valid.nonzero().squeeze(-1)
    hidden = student_hidden.reshape(-1, hidden_size)[rows]
    flat_labels = (labels.reshape(-1)[rows] if labels is not None
                   else torch.zeros(rows.shape[0], dtype=torch.long, device=hidden.device))
    teacher_rows = teacher.token_rows(rows, flat_valid.shape[0]) if teacher is not None else None
    vocab_size = vocab_size or student_weight.shape[0]
    if teacher_rows is not None and teacher_rows.topk_ids is not None and teacher_rows.topk_ids.numel():
        largest = int(teacher_rows.topk_ids.max())
        if largest >= vocab_size or int(teacher_rows.topk_ids.min()) < 0:
            raise ValueError(f"teacher top-k ids reach {largest}, outside the vocabulary of {vocab_size}")
    count = num_valid_tokens if num_valid_tokens is not None else max(int(rows.shape[0]), 1)
    terms = parts if parts is not None else {}  # unweighted kd / ce, summed over chunks

    def chunk_loss(logits, teacher_logits, chunk_labels, num_valid, kd_logits):
        value = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        if divergence is not None:
            kd = divergence(kd_logits, teacher_logits, temperature=temperature, num_valid_tokens=num_valid, **params)
            terms["kd"] = terms.get("kd", 0.0) + float(kd.detach())
            value = value + kd_weight * kd
        if ce_weight > 0:
            ce = cross_entropy(logits, chunk_labels, num_valid_tokens=num_valid)
            terms["ce"] = terms.get("ce", 0.0) + float(ce.detach())
            value = value + ce_weight * ce
        return value

    def combine(chunk_terms, num_valid):
        """A closed-form chunk's weighted value from its unweighted sums."""
        value = 0.0
        for name, weight in (("kd", kd_weight), ("ce", ce_weight)):
            if name in chunk_terms:
                term = chunk_terms[name] / float(num_valid)
                terms[name] = terms.get(name, 0.0) + float(term)
                value = value + weight * term
        return value

    chunk_loss.combine, chunk_loss.temperature = combine, temperature
    bucketed = teacher is not None and teacher.tail_logmass is not None
    closed_form = None if bucketed else closed_form_for(divergence, params, kd_weight, ce_weight, temperature)
    copies = closed_form[1] if closed_form is not None else LOGIT_COPIES_PER_TOKEN
    chunk = chunk_size or chunk_size_for(vocab_size, memory_budget_bytes, copies)
    return _FusedLinearLoss.apply(hidden, student_weight, student_bias, teacher_rows, flat_labels, chunk_loss,
                                  closed_form, count, chunk, vocab_size)
