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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.logits import IGNORE_INDEX, cross_entropy, forward_kl, get_loss

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
      top-k get zero probability (the top-k mass is renormalised by the softmax)."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None

    def __post_init__(self):
        forms = [self.hidden is not None, self.logits is not None, self.topk_ids is not None]
        if sum(forms) != 1:
            raise ValueError("give the teacher as exactly one of hidden+weight, logits, or topk_ids+topk_logprobs")
        if self.hidden is not None and self.weight is None:
            raise ValueError("teacher hidden states need the teacher's lm_head weight")
        if self.topk_ids is not None and self.topk_logprobs is None:
            raise ValueError("topk_ids need topk_logprobs")

    def token_rows(self, rows: Tensor, num_tokens: int) -> "TeacherSignal":
        """The signal flattened to [tokens, ...] and restricted to token `rows`."""
        def take(name):
            value = getattr(self, name)
            if value is None:
                return None
            flat = value.reshape(-1, value.shape[-1])
            if flat.shape[0] != num_tokens:
                raise ValueError(f"teacher {name} has {flat.shape[0]} token rows, the student {num_tokens}")
            return flat[rows]
        return TeacherSignal(hidden=take("hidden"), weight=self.weight, bias=self.bias, logits=take("logits"),
                             topk_ids=take("topk_ids"), topk_logprobs=take("topk_logprobs"))

    def chunk_logits(self, start: int, end: int, vocab_size: int) -> Tensor:
        """Teacher logits of rows start:end over the first `vocab_size` entries."""
        if self.logits is not None:
            return self.logits[start:end, :vocab_size]
        if self.hidden is not None:
            logits = self.hidden[start:end] @ self.weight[:vocab_size].T
            return logits + self.bias[:vocab_size] if self.bias is not None else logits
        ids, logprobs = self.topk_ids[start:end], self.topk_logprobs[start:end]
        dense = torch.full((ids.shape[0], vocab_size), float("-inf"), dtype=logprobs.dtype, device=logprobs.device)
        return dense.scatter(1, ids, logprobs)


def not_token_separable() -> set[str]:
    """Divergences whose value is not a sum of per-token terms (they couple tokens)."""
    import distill.losses

    return set(getattr(distill.losses, "NOT_TOKEN_SEPARABLE", ()))


def chunk_size_for(vocab_size: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> int:
    """Tokens per chunk so that a chunk's full-vocabulary float32 tensors fit the budget."""
    return max(1, memory_budget_bytes // (vocab_size * 4 * LOGIT_COPIES_PER_TOKEN))


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, loss_fn, params, num_valid_tokens, chunk_size,
                vocab_size):
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        weight_leaf = weight.detach().requires_grad_()
        bias_leaf = bias.detach().requires_grad_() if bias is not None else None
        closed_form = getattr(loss_fn, "closed_form", None)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            if closed_form is not None:  # value and logit gradient in closed form: no autograd graph
                with torch.no_grad():
                    hidden_chunk = hidden[start:end].detach()
                    logits = hidden_chunk @ weight[:vocab_size].T
                    if bias is not None:
                        logits = logits + bias[:vocab_size]
                    teacher_logits = teacher.chunk_logits(start, end, vocab_size) if teacher is not None else None
                    value, grad_logits = closed_form(logits, teacher_logits, labels[start:end], num_valid_tokens)
                    grad_logits = grad_logits.to(hidden.dtype)
                    grad_hidden[start:end] = grad_logits @ weight[:vocab_size]
                    grad_weight[:vocab_size] += grad_logits.T @ hidden_chunk
                    if grad_bias is not None:
                        grad_bias[:vocab_size] += grad_logits.sum(0)
                total += value
                continue
            hidden_chunk = hidden[start:end].detach().requires_grad_()
            with torch.enable_grad():
                logits = hidden_chunk @ weight_leaf[:vocab_size].T
                if bias_leaf is not None:
                    logits = logits + bias_leaf[:vocab_size]
                with torch.no_grad():
                    teacher_logits = teacher.chunk_logits(start, end, vocab_size) if teacher is not None else None
                chunk_loss = loss_fn(logits, teacher_logits, labels[start:end], num_valid_tokens, params)
            inputs = [hidden_chunk, weight_leaf] + ([bias_leaf] if bias_leaf is not None else [])
            grads = torch.autograd.grad(chunk_loss, inputs, allow_unused=True)
            grad_hidden[start:end] = grads[0]
            if grads[1] is not None:
                grad_weight += grads[1]
            if bias_leaf is not None and grads[2] is not None:
                grad_bias += grads[2]
            total += chunk_loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight, *([grad_bias] if grad_bias is not None else []))
        ctx.has_bias = grad_bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grad_hidden, grad_weight = saved[0] * grad_output, saved[1] * grad_output
        grad_bias = saved[2] * grad_output if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _closed_form_forward_kl_and_ce(kd_weight: float, ce_weight: float, temperature: float, terms: dict):
    """(value, d value / d logits) of kd_weight * forward KL + ce_weight * CE for one chunk.

    With s = z_S / T: d KL(p_T || p_S) / d z_S = (p_S - p_T) / T per token, and
    d CE / d z_S = p_S(T=1) - onehot(label); both divided by the valid-token count. Skipping
    autograd's saved intermediates makes the chunk ~1.5x cheaper than the generic path."""
    def closed_form(logits, teacher_logits, labels, num_valid):
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(compute_dtype)
        count = float(num_valid)
        value = logits.new_zeros(())
        grad = torch.zeros_like(logits)
        if kd_weight > 0:
            student_logprobs = torch.log_softmax(logits / temperature, dim=-1)
            teacher_logprobs = torch.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=-1)
            teacher_probs = teacher_logprobs.exp()
            floor = math.log(torch.finfo(compute_dtype).tiny)  # as the generic path's log-prob floor
            pointwise = teacher_probs * (teacher_logprobs.clamp(min=floor) - student_logprobs.clamp(min=floor))
            kd = torch.where(teacher_probs > 0, pointwise, 0.0).sum() / count
            terms["kd"] = terms.get("kd", 0.0) + float(kd.detach())
            value = value + kd_weight * kd
            grad += (kd_weight / (temperature * count)) * (student_logprobs.exp() - teacher_probs)
        if ce_weight > 0:
            logprobs = torch.log_softmax(logits, dim=-1)
            ce = -logprobs.gather(-1, labels[:, None]).sum() / count
            terms["ce"] = terms.get("ce", 0.0) + float(ce.detach())
            value = value + ce_weight * ce
            probs = logprobs.exp()
            probs.scatter_add_(-1, labels[:, None], -torch.ones_like(labels[:, None], dtype=probs.dtype))
            grad += (ce_weight / count) * probs
        return value, grad
    return closed_form


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
    `kd_weight * get_loss(loss)(logits, teacher_logits, mask, ...) + ce_weight * cross_entropy(...)`
    on the materialised logits. A `parts` dict, if given, receives the unweighted `kd` and `ce`
    values (for logging: one pass computes both)."""
    divergence = get_loss(loss) if kd_weight > 0 else None
    if divergence is not None and divergence.__name__ in not_token_separable():
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
    count = num_valid_tokens if num_valid_tokens is not None else max(int(rows.shape[0]), 1)
    chunk = chunk_size or chunk_size_for(vocab_size, memory_budget_bytes)

    terms = parts if parts is not None else {}  # unweighted kd / ce, summed over chunks

    def chunk_loss(logits, teacher_logits, chunk_labels, num_valid, loss_params):
        value = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        if divergence is not None:
            kd = divergence(logits, teacher_logits, temperature=temperature, num_valid_tokens=num_valid, **loss_params)
            terms["kd"] = terms.get("kd", 0.0) + float(kd.detach())
            value = value + kd_weight * kd
        if ce_weight > 0:
            ce = cross_entropy(logits, chunk_labels, num_valid_tokens=num_valid)
            terms["ce"] = terms.get("ce", 0.0) + float(ce.detach())
            value = value + ce_weight * ce
        return value

    if divergence is None or divergence is forward_kl:
        chunk_loss.closed_form = _closed_form_forward_kl_and_ce(kd_weight if divergence else 0.0, ce_weight,
                                                                temperature, terms)
    return _FusedLinearLoss.apply(hidden, student_weight, student_bias, teacher_rows, flat_labels, chunk_loss,
                                  params, count, chunk, vocab_size)
