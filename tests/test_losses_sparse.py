"""A sparse (top-k) teacher against a full student: the k + 1 bucket view and the renormalised view."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import get_spec, specs
from distill.losses.fused import TeacherSignal, fused_linear_distillation
from distill.losses.sparse import dense_teacher_logits, student_topk_tail_logits, teacher_topk_tail_logits


def _naive_buckets(student_logits, ids, temperature):
    """log of [p(id_1), ..., p(id_k), 1 - sum p(ids)] by explicit probabilities, float64."""
    probs = torch.softmax(student_logits.double() / temperature, -1)
    top = probs.gather(-1, ids)
    return torch.log(torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_buckets_are_its_probabilities_at_the_teacher_ids_and_the_rest(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 31, generator=generator, dtype=torch.float64).requires_grad_()
    ids = torch.rand(3, 4, 31, generator=generator).argsort(-1)[..., :5]
    collapsed = student_topk_tail_logits(logits, ids, temperature)
    # columns are T * log p^T, so the divergence's own / T gives log p^T
    torch.testing.assert_close(collapsed / temperature, _naive_buckets(logits, ids, temperature))
    weights = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((collapsed * weights).sum(), logits)[0]
    want = torch.autograd.grad((_naive_buckets(logits, ids, temperature) * temperature * weights).sum(), logits)[0]
    torch.testing.assert_close(got, want)


def test_hand_value_of_the_bucketed_forward_kl():
    """V = 3, k = 1. Student uniform; teacher keeps token 0 with p = 1/2 and 1/2 in the tail:
    KL = 1/2 log((1/2)/(1/3)) + 1/2 log((1/2)/(2/3))."""
    student = torch.zeros(1, 3, dtype=torch.float64)
    ids = torch.tensor([[0]])
    teacher = teacher_topk_tail_logits(torch.tensor([[math.log(0.5)]], dtype=torch.float64),
                                       torch.tensor([math.log(0.5)], dtype=torch.float64))
    value = get_spec("forward_kl", kind="token").fn(student_topk_tail_logits(student, ids), teacher)
    assert value.item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), abs=1e-12)


def test_renormalized_teacher_puts_its_top_k_in_place():
    ids = torch.tensor([[2, 0]])
    dense = dense_teacher_logits(ids, torch.tensor([[-0.1, -3.0]]), 4)
    assert dense[0, 2] == pytest.approx(-0.1) and dense[0, 0] == pytest.approx(-3.0)
    assert torch.isinf(dense[0, 1]) and torch.isinf(dense[0, 3])


@pytest.mark.parametrize("loss", [spec.name for spec in specs("token") if spec.token_separable])
def test_fused_path_with_a_top_k_and_tail_teacher_equals_the_plain_one(loss):
    """Every token-separable divergence, chunked from hidden states, against the bucketed plain loss."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(23, 7, generator=generator, dtype=torch.float64).requires_grad_()
    teacher_logprobs = torch.log_softmax(torch.randn(2, 5, 23, generator=generator, dtype=torch.float64) * 2, -1)
    top = teacher_logprobs.topk(6, -1)
    tail = teacher_logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    mask = torch.rand(2, 5, generator=generator) > 0.3
    logits = hidden @ weight.T
    expected = get_spec(loss, kind="token").fn(student_topk_tail_logits(logits, top.indices, 1.5),
                                               teacher_topk_tail_logits(top.values, tail), mask, temperature=1.5)
    teacher = TeacherSignal(topk_ids=top.indices, topk_logprobs=top.values, tail_logmass=tail)
    value = fused_linear_distillation(hidden, weight, teacher, mask=mask, loss=loss, temperature=1.5, chunk_size=3)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    for got, want in zip(torch.autograd.grad(value, [hidden, weight]), torch.autograd.grad(expected, [hidden, weight])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss", [spec.name for spec in specs("token")])
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
def test_every_divergence_is_finite_on_a_sparse_teacher(loss, mode):
    """Both views of a top-k teacher (zeros outside the top-k in `renormalize`) give finite values and
    gradients for every registered divergence, including the ones that couple tokens."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 19, generator=generator).requires_grad_()
    teacher_logprobs = torch.log_softmax(torch.randn(2, 4, 19, generator=generator) * 3, -1)
    top = teacher_logprobs.topk(5, -1)
    if mode == "tail":
        tail = teacher_logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        student, teacher = student_topk_tail_logits(logits, top.indices), teacher_topk_tail_logits(top.values, tail)
    else:
        student, teacher = logits, dense_teacher_logits(top.indices, top.values, 19)
    value = get_spec(loss, kind="token").fn(student, teacher, torch.ones(2, 4, dtype=torch.bool))
    grad, = torch.autograd.grad(value, logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
