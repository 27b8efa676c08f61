"""The chunked fused-linear loss equals the plain loss on materialised logits, values and
gradients, for every divergence, every teacher form and chunk sizes that split unevenly."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import cross_entropy, get_spec, specs
from distill.losses.closed_form import closed_form_for
from distill.losses.fused import TeacherSignal, chunk_size_for, fused_linear_distillation

TOKEN_SEPARABLE = [spec.name for spec in specs("token") if spec.token_separable]


def token_divergence(name: str):
    """The registered token divergence `name` (or alias)."""
    return get_spec(name, kind="token").fn


def _problem(dtype, vocab=37, hidden=11, shape=(3, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=dtype)
    student_hidden = randn(*shape, hidden).requires_grad_()
    weight = (randn(vocab, hidden) * 0.7).requires_grad_()
    bias = (randn(vocab) * 0.1).requires_grad_()
    teacher_hidden, teacher_weight, teacher_bias = randn(*shape, 13), randn(vocab, 13), randn(vocab) * 0.1
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[0, :2] = -100  # e.g. a prompt
    mask = torch.rand(shape, generator=generator) > 0.2
    return student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask


def _naive(loss, student_hidden, weight, bias, teacher_logits, labels, mask, kd_weight, ce_weight, **params):
    logits = student_hidden @ weight.T + bias
    valid = mask & (labels != -100)
    value = kd_weight * token_divergence(loss)(logits, teacher_logits, valid, temperature=1.5, **params)
    return value + ce_weight * cross_entropy(logits, labels, valid)


@pytest.mark.parametrize("loss", TOKEN_SEPARABLE)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_fused_equals_naive_values_and_gradients(loss, dtype, tolerance):
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(dtype)
    teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias
    expected = _naive(loss, student_hidden, weight, bias, teacher_logits, labels, mask, 0.7, 0.3)
    expected_grads = torch.autograd.grad(expected, [student_hidden, weight, bias])
    for chunk_size in (1, 4, 5, 1000):
        teacher = TeacherSignal(hidden=teacher_hidden, weight=teacher_weight, bias=teacher_bias)
        value = fused_linear_distillation(student_hidden, weight, teacher, labels=labels, mask=mask, loss=loss,
                                          kd_weight=0.7, ce_weight=0.3, temperature=1.5, student_bias=bias,
                                          chunk_size=chunk_size)
        grads = torch.autograd.grad(value * 2.0, [student_hidden, weight, bias])  # upstream gradient 2
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, 2.0 * want, rtol=tolerance, atol=tolerance)


CLOSED_FORMS = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}),
                ("jsd", {"beta": 1.0})]


@pytest.mark.parametrize("loss, params", CLOSED_FORMS)
@pytest.mark.parametrize("temperature, kd_weight, ce_weight", [(1.0, 0.7, 0.3), (1.5, 1.0, 0.0), (1.0, 0.0, 1.0),
                                                               (0.8, 0.6, 0.4)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_closed_form_chunks_equal_naive(loss, params, temperature, kd_weight, ce_weight, dtype, tolerance):
    """The in-place closed-form chunk math (no autograd) against autograd on materialised logits."""
    divergence = token_divergence(loss) if kd_weight > 0 else None
    closed = closed_form_for(divergence, params, kd_weight, ce_weight, temperature)
    uses_generic = loss != "forward_kl" and params.get("beta") != 0.0 and ce_weight > 0 and temperature != 1.0
    assert (closed is None) == uses_generic  # CE at T != 1 beside reverse KL / JSD stays on autograd
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(dtype, seed=3)
    teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias
    logits = student_hidden @ weight.T + bias
    valid = mask & (labels != -100)
    expected = ce_weight * cross_entropy(logits, labels, valid)
    if kd_weight > 0:
        expected = expected + kd_weight * token_divergence(loss)(logits, teacher_logits, valid,
                                                                 temperature=temperature, **params)
    expected_grads = torch.autograd.grad(expected, [student_hidden, weight, bias])
    for chunk_size in (1, 5, 1000):
        value = fused_linear_distillation(student_hidden, weight, TeacherSignal(logits=teacher_logits), labels=labels,
                                          mask=mask, loss=loss, kd_weight=kd_weight, ce_weight=ce_weight,
                                          temperature=temperature, student_bias=bias, chunk_size=chunk_size, **params)
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance)
        for got, want in zip(torch.autograd.grad(value, [student_hidden, weight, bias]), expected_grads):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("loss, params", CLOSED_FORMS[:3])
def test_closed_form_float32_value_keeps_its_digits_at_a_large_vocabulary(loss, params):
    """Sums over ~10^6 float32 terms: the chunk value must stay as exact as the per-token path."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(48, 32, generator=generator), torch.randn(20000, 32, generator=generator) * 0.5
    teacher_logits = torch.randn(48, 20000, generator=generator) * 3
    expected = token_divergence(loss)(hidden.double() @ weight.double().T, teacher_logits.double(), **params)
    value = fused_linear_distillation(hidden, weight, TeacherSignal(logits=teacher_logits), loss=loss, chunk_size=48,
                                      **params)
    assert value.item() == pytest.approx(expected.item(), rel=3e-7)  # naive float32: ~1e-6


def test_closed_form_hand_value():
    """One token, two classes, no head bias: forward KL by hand and its gradient (p_S - p_T) h."""
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # p_S = (1/2, 1/2)
    teacher_logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_T = (3/4, 1/4)
    value = fused_linear_distillation(hidden, weight, TeacherSignal(logits=teacher_logits))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert value.item() == pytest.approx(expected, abs=1e-12)
    value.backward()
    # d/dz = p_S - p_T = (-1/4, 1/4); d/dW = outer(d/dz, h)
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25, 0.0], [0.25, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("loss, params", [("jsd", {"beta": 0.3}), ("forward_kl", {}), ("reverse_kl", {}),
                                          ("tvd", {})])  # closed forms and generic
@pytest.mark.parametrize("form", ["hidden", "logits", "topk"])
def test_every_teacher_form_gives_the_same_loss(form, loss, params):
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias
    if form == "topk":
        # A sparse teacher: its top-8 log-probs; the naive reference puts -inf elsewhere.
        top = torch.log_softmax(teacher_logits, -1).topk(8, dim=-1)
        teacher = TeacherSignal(topk_ids=top.indices, topk_logprobs=top.values)
        teacher_logits = torch.full_like(teacher_logits, float("-inf")).scatter(-1, top.indices, top.values)
    elif form == "logits":
        teacher = TeacherSignal(logits=teacher_logits)
    else:
        teacher = TeacherSignal(hidden=teacher_hidden, weight=teacher_weight, bias=teacher_bias)
    expected = _naive(loss, student_hidden, weight, bias, teacher_logits, labels, mask, 1.0, 0.0, **params)
    value = fused_linear_distillation(student_hidden, weight, teacher, labels=labels, mask=mask, loss=loss,
                                      temperature=1.5, student_bias=bias, chunk_size=3, **params)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(value, [student_hidden, weight, bias]),
                         torch.autograd.grad(expected, [student_hidden, weight, bias])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_padded_vocabulary_rows_are_ignored_and_get_no_gradient():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    labels = labels.clamp(max=29)
    teacher = TeacherSignal(hidden=teacher_hidden, weight=teacher_weight, bias=teacher_bias)
    value = fused_linear_distillation(student_hidden, weight, teacher, labels=labels, mask=mask, vocab_size=30,
                                      ce_weight=1.0, chunk_size=4)
    logits = (student_hidden @ weight.T)[..., :30]
    valid = mask & (labels != -100)
    teacher_logits = (teacher_hidden @ teacher_weight.T + teacher_bias)[..., :30]
    expected = token_divergence("forward_kl")(logits, teacher_logits, valid) + cross_entropy(logits, labels, valid)
    torch.testing.assert_close(value, expected)
    grad_weight = torch.autograd.grad(value, weight)[0]
    assert grad_weight[30:].abs().max() == 0


def test_num_valid_tokens_makes_micro_batches_add_up():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    teacher_logits = teacher_hidden @ teacher_weight.T
    total = int((mask & (labels != -100)).sum())
    full = fused_linear_distillation(student_hidden, weight, TeacherSignal(logits=teacher_logits), labels=labels,
                                     mask=mask, chunk_size=2)
    parts = sum(fused_linear_distillation(student_hidden[i:i + 1], weight, TeacherSignal(logits=teacher_logits[i:i + 1]),
                                          labels=labels[i:i + 1], mask=mask[i:i + 1], num_valid_tokens=total,
                                          chunk_size=2) for i in range(3))
    torch.testing.assert_close(parts, full)


def test_chunk_size_follows_the_memory_budget():
    assert chunk_size_for(151936, 512 * 2**20) == 88
    assert chunk_size_for(32000, 512 * 2**20) == 419
    assert chunk_size_for(10**9, 1) == 1


def test_bad_input_is_refused():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    with pytest.raises(ValueError, match="exactly one"):
        TeacherSignal(logits=teacher_hidden, hidden=teacher_hidden, weight=teacher_weight)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_distillation(student_hidden, weight, None, kd_weight=0.0, ce_weight=1.0)
    with pytest.raises(ValueError, match="token rows"):
        fused_linear_distillation(student_hidden, weight, TeacherSignal(logits=torch.zeros(5, 37, dtype=torch.float64)))


def test_parts_report_each_unweighted_term_of_one_pass():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    teacher = TeacherSignal(hidden=teacher_hidden, weight=teacher_weight)
    for loss in ("forward_kl", "jsd"):  # closed-form and generic chunks
        parts = {}
        value = fused_linear_distillation(student_hidden, weight, teacher, labels=labels, mask=mask, loss=loss,
                                          kd_weight=0.7, ce_weight=0.3, chunk_size=4, parts=parts)
        logits = (student_hidden @ weight.T).detach()
        valid = mask & (labels != -100)
        kd = token_divergence(loss)(logits, teacher_hidden @ teacher_weight.T, valid)
        assert parts["kd"] == pytest.approx(kd.item())
        assert parts["ce"] == pytest.approx(cross_entropy(logits, labels, valid).item())
        assert value.detach().item() == pytest.approx(0.7 * parts["kd"] + 0.3 * parts["ce"])


@pytest.mark.parametrize("loss", [spec.name for spec in specs("token") if not spec.token_separable])
def test_losses_that_couple_tokens_are_refused_by_their_spec(loss):
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, mask = _problem(torch.float64)
    with pytest.raises(ValueError, match="couples tokens"):
        fused_linear_distillation(student_hidden, weight, TeacherSignal(hidden=teacher_hidden, weight=teacher_weight),
                                  mask=mask, loss=loss)
