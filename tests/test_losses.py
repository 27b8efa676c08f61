"""Tests for distill.losses: naive references, hand-computed values, gradcheck, properties, bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import HAND_STUDENT, HAND_TEACHER, random_loss_inputs as _random_inputs
from distill.losses import (
    cross_entropy, forward_kl, get_spec, jsd, masked_mean, reverse_kl, skew_kl, skew_reverse_kl, specs, tvd,
)

torch.set_num_threads(1)

# The divergences of distill.losses.logits; the rest of the family has its own naive references in
# test_losses_family.py.
LOSS_NAMES = [spec.name for spec in specs("token") if spec.fn.__module__ == forward_kl.__module__]
SHAPES = [(3, 7, 31), (2, 5, 3, 13)]


def divergence(name: str):
    """The registered token divergence `name` (or alias)."""
    return get_spec(name, kind="token").fn


# ---------------------------------------------------------------------------------------------
# Naive reference: one token at a time, written from the probabilities, float64
# ---------------------------------------------------------------------------------------------

def _probs(logits_row: torch.Tensor) -> torch.Tensor:
    exps = torch.exp(logits_row - logits_row.max())
    return exps / exps.sum()


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for v in range(p.shape[0]):
        if p[v] > 0:  # 0 log 0 = 0
            total = total + p[v] * torch.log(p[v] / q[v])
    return total


def _naive_divergence(name: str, p_t: torch.Tensor, p_s: torch.Tensor, **params) -> torch.Tensor:
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        mixture = beta * p_t + (1 - beta) * p_s
        return beta * _kl(p_t, mixture) + (1 - beta) * _kl(p_s, mixture)
    if name == "tvd":
        return 0.5 * sum(abs(p_t[v] - p_s[v]) for v in range(p_t.shape[0]))
    if name == "skew_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_reverse_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    raise AssertionError(name)


def _naive_loss(name, student_logits, teacher_logits, mask, temperature=1.0, **params):
    """Loop over tokens in float64; differentiable so autograd gives the reference gradient."""
    vocab = student_logits.shape[-1]
    student_rows = student_logits.to(torch.float64).reshape(-1, vocab)
    teacher_rows = teacher_logits.to(torch.float64).reshape(-1, vocab)
    mask_rows = [True] * student_rows.shape[0] if mask is None else mask.reshape(-1).tolist()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i, valid in enumerate(mask_rows):
        if valid:
            p_s = _probs(student_rows[i] / temperature)
            p_t = _probs(teacher_rows[i] / temperature)
            total = total + _naive_divergence(name, p_t, p_s, **params)
            count += 1
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# 1. Against the naive reference, value and gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_naive_reference(name, shape, dtype, tol):
    student, teacher, mask = _random_inputs(shape, dtype)
    loss = divergence(name)(student, teacher, mask)
    assert loss.dim() == 0 and loss.dtype == dtype
    student_grad, teacher_grad = torch.autograd.grad(loss, (student, teacher))

    ref_student = student.detach().to(torch.float64).requires_grad_(True)
    ref_teacher = teacher.detach().to(torch.float64).requires_grad_(True)
    reference = _naive_loss(name, ref_student, ref_teacher, mask)
    ref_student_grad, ref_teacher_grad = torch.autograd.grad(reference, (ref_student, ref_teacher))

    assert abs(loss.item() - reference.item()) < tol
    torch.testing.assert_close(student_grad.double(), ref_student_grad, rtol=0, atol=tol)
    torch.testing.assert_close(teacher_grad.double(), ref_teacher_grad, rtol=0, atol=tol)


@pytest.mark.parametrize("name, params", [("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.9}),
                                          ("skew_kl", {"alpha": 0.3}), ("skew_reverse_kl", {"alpha": 0.5})])
def test_matches_naive_reference_with_parameters_and_temperature(name, params):
    student, teacher, mask = _random_inputs((3, 7, 31))
    loss = divergence(name)(student, teacher, mask, temperature=1.7, **params)
    reference = _naive_loss(name, student, teacher, mask, temperature=1.7, **params)
    assert abs(loss.item() - reference.item()) < 1e-10


# ---------------------------------------------------------------------------------------------
# 2. Hand-computed values: p_S = [.5, .5] (logits [0, 0]), p_T = [.75, .25] (logits [ln 3, 0])
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("name, params, expected", [
    # .75 ln(.75/.5) + .25 ln(.25/.5) = .75 ln 1.5 + .25 ln .5 = 0.304099 - 0.173287 = 0.130812
    ("forward_kl", {}, 0.13081203594113697),
    # .5 ln(.5/.75) + .5 ln(.5/.25) = -0.202733 + 0.346574 = 0.143841
    ("reverse_kl", {}, 0.14384103622589042),
    # M = [.625, .375]; KL(T||M) = .75 ln 1.2 + .25 ln(2/3) = 0.035375;
    # KL(S||M) = .5 ln .8 + .5 ln(4/3) = 0.032269; .5 * (0.035375 + 0.032269) = 0.033822
    ("jsd", {"beta": 0.5}, 0.033822075568605205),
    # .5 * (|.75 - .5| + |.25 - .5|) = .25
    ("tvd", {}, 0.25),
    # M = .1 T + .9 S = [.525, .475]; .75 ln(.75/.525) + .25 ln(.25/.475) = 0.267506 - 0.160463 = 0.107043
    ("skew_kl", {"alpha": 0.1}, 0.10704273641095058),
    # M = .1 S + .9 T = [.725, .275]; .5 ln(.5/.725) + .5 ln(.5/.275) = -0.185782 + 0.298919 = 0.113137
    ("skew_reverse_kl", {"alpha": 0.1}, 0.11313672216156873),
])
def test_hand_computed_value(name, params, expected):
    assert abs(divergence(name)(HAND_STUDENT, HAND_TEACHER, **params).item() - expected) < 1e-6


def test_hand_computed_cross_entropy():
    # -ln .5 = 0.693147 for the uniform student; -ln .25 = 1.386294 for label 1 under p = [.75, .25]
    assert abs(cross_entropy(HAND_STUDENT, torch.tensor([0])).item() - 0.6931471805599453) < 1e-6
    assert abs(cross_entropy(HAND_TEACHER, torch.tensor([1])).item() - 1.3862943611198906) < 1e-6


# ---------------------------------------------------------------------------------------------
# 3. gradcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck(name):
    student, teacher, mask = _random_inputs((2, 3, 5), seed=1)
    assert torch.autograd.gradcheck(lambda s, t: divergence(name)(s, t, mask, temperature=1.3), (student, teacher))


def test_gradcheck_cross_entropy():
    student, _, mask = _random_inputs((2, 3, 5), seed=2)
    labels = torch.tensor([[0, 4, -100], [2, 1, 3]])
    assert torch.autograd.gradcheck(lambda s: cross_entropy(s, labels, mask), (student,))


# ---------------------------------------------------------------------------------------------
# 4. Properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_for_identical_inputs(name):
    student, _, mask = _random_inputs((3, 7, 31))
    assert abs(divergence(name)(student, student.detach().clone(), mask).item()) < 1e-12


def test_jsd_endpoints_are_exactly_the_kls():
    student, teacher, mask = _random_inputs((3, 7, 31))
    assert torch.equal(jsd(student, teacher, mask, beta=0.0), forward_kl(student, teacher, mask))
    assert torch.equal(jsd(student, teacher, mask, beta=1.0), reverse_kl(student, teacher, mask))


def test_skew_with_alpha_zero_is_plain_kl():
    student, teacher, mask = _random_inputs((3, 7, 31))
    assert torch.equal(skew_kl(student, teacher, mask, alpha=0.0), forward_kl(student, teacher, mask))
    assert torch.equal(skew_reverse_kl(student, teacher, mask, alpha=0.0), reverse_kl(student, teacher, mask))


def test_forward_kl_matches_torch_kl_div():
    student, teacher, _ = _random_inputs((3, 7, 31))
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="sum") / (3 * 7)
    torch.testing.assert_close(forward_kl(student, teacher), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_invariant_to_per_token_shift(name):
    student, teacher, mask = _random_inputs((3, 7, 31))
    shifted = divergence(name)(student + 5 * torch.randn(3, 7, 1, dtype=torch.float64),
                             teacher - 7 * torch.randn(3, 7, 1, dtype=torch.float64), mask)
    assert abs(shifted.item() - divergence(name)(student, teacher, mask).item()) < 1e-10


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_temperature_divides_both_logits(name):
    student, teacher, mask = _random_inputs((3, 7, 31))
    torch.testing.assert_close(divergence(name)(student, teacher, mask, temperature=2.0),
                               divergence(name)(student / 2, teacher / 2, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_computes_in_float32(name):
    student, teacher, mask = _random_inputs((3, 7, 31), dtype=torch.bfloat16)
    loss = divergence(name)(student, teacher, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, divergence(name)(student.float(), teacher.float(), mask), rtol=1e-6, atol=1e-6)
    (student_grad,) = torch.autograd.grad(loss, (student,))
    assert student_grad.dtype == torch.bfloat16 and torch.isfinite(student_grad.float()).all()


@pytest.mark.parametrize("name", LOSS_NAMES + ["cross_entropy"])
def test_micro_batches_with_num_valid_tokens_equal_full_batch(name):
    student, teacher, mask = _random_inputs((4, 6, 11), seed=3)
    labels = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(4))

    def loss(rows: slice, **kwargs):
        if name == "cross_entropy":
            return cross_entropy(student[rows], labels[rows], mask[rows], **kwargs)
        return divergence(name)(student[rows], teacher[rows], mask[rows], **kwargs)

    full = loss(slice(None))
    full_grads = torch.autograd.grad(full, (student, teacher), allow_unused=True)
    total = mask.sum()
    accumulated = loss(slice(0, 2), num_valid_tokens=total) + loss(slice(2, 4), num_valid_tokens=int(total))
    accumulated_grads = torch.autograd.grad(accumulated, (student, teacher), allow_unused=True)
    torch.testing.assert_close(accumulated, full, rtol=1e-12, atol=1e-12)
    for accumulated_grad, full_grad in zip(accumulated_grads, full_grads):
        if full_grad is not None:
            torch.testing.assert_close(accumulated_grad, full_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES + ["cross_entropy"])
def test_all_masked_gives_zero_without_nan(name):
    student, teacher, _ = _random_inputs((2, 3, 5))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    if name == "cross_entropy":
        loss = cross_entropy(student, torch.full((2, 3), -100))
    else:
        loss = divergence(name)(student, teacher, mask)
    (student_grad,) = torch.autograd.grad(loss, (student,))
    assert loss.item() == 0.0 and torch.equal(student_grad, torch.zeros_like(student))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_minus_inf_teacher_logits_give_finite_loss_and_gradients(name):
    student, teacher, mask = _random_inputs((3, 7, 31), dtype=torch.float32)
    blocked_vocabulary = torch.zeros(31, dtype=torch.bool)
    blocked_vocabulary[[0, 5, 30]] = True
    teacher = teacher.detach().masked_fill(blocked_vocabulary, float("-inf")).requires_grad_(True)
    loss = divergence(name)(student, teacher, mask)
    student_grad, teacher_grad = torch.autograd.grad(loss, (student, teacher))
    assert torch.isfinite(loss) and torch.isfinite(student_grad).all() and torch.isfinite(teacher_grad).all()


def test_minus_inf_teacher_logits_count_as_zero_probability_in_forward_kl():
    student, teacher, mask = _random_inputs((3, 7, 31))
    teacher = teacher.detach().clone()
    teacher[..., :4] = float("-inf")
    reference = _naive_loss("forward_kl", student, teacher, mask)  # skips p_T = 0 terms
    assert abs(forward_kl(student, teacher, mask).item() - reference.item()) < 1e-10


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_positions_with_extreme_logits_get_zero_gradient(name):
    student, teacher, mask = _random_inputs((3, 7, 31))
    student = student.detach().clone()
    teacher = teacher.detach().clone()
    student[~mask] = 1e30
    teacher[~mask] = float("-inf")  # e.g. padding rows with no valid vocabulary at all
    student.requires_grad_(True)
    loss = divergence(name)(student, teacher, mask)
    (student_grad,) = torch.autograd.grad(loss, (student,))
    assert torch.isfinite(loss) and torch.isfinite(student_grad).all()
    assert torch.equal(student_grad[~mask], torch.zeros_like(student_grad[~mask]))


def test_cross_entropy_matches_torch_and_ignores_minus_100():
    student, _, _ = _random_inputs((3, 7, 31))
    labels = torch.randint(0, 31, (3, 7), generator=torch.Generator().manual_seed(5))
    labels[0, :3] = -100
    labels[2, 6] = -100
    expected = F.cross_entropy(student.reshape(-1, 31), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(student, labels), expected, rtol=1e-12, atol=1e-12)


def test_cross_entropy_combines_mask_and_ignore_index():
    student, _, mask = _random_inputs((3, 7, 31))
    labels = torch.randint(0, 31, (3, 7), generator=torch.Generator().manual_seed(6))
    labels[1, 2] = -100
    keep = mask & (labels != -100)
    expected = F.cross_entropy(student[keep], labels[keep])
    torch.testing.assert_close(cross_entropy(student, labels, mask), expected, rtol=1e-12, atol=1e-12)


def test_masked_mean():
    values = torch.tensor([1.0, float("inf"), 3.0])
    mask = torch.tensor([True, False, True])
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, num_valid_tokens=4).item() == 1.0
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Registry and look-up
# ---------------------------------------------------------------------------------------------

def test_registry_is_documented():
    assert LOSS_NAMES == ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
    for spec in specs("token"):
        assert spec.formula and spec.paper
        assert spec.fn.__doc__ and "Source" in spec.fn.__doc__


def test_look_up_by_name_and_alias():
    assert divergence("kl") is forward_kl and divergence("fkl") is forward_kl and divergence("rkl") is reverse_kl
    assert divergence("tvd") is tvd and divergence("skl") is skew_kl and divergence("srkl") is skew_reverse_kl
    assert get_spec("kl", kind="token").name == "forward_kl"
    with pytest.raises(ValueError, match="forward_kl"):
        divergence("nope")


def test_loss_parameters():
    assert get_spec("forward_kl", kind="token").defaults() == {}
    assert get_spec("jsd", kind="token").defaults() == {"beta": 0.5}
    assert get_spec("skew_kl", kind="token").defaults() == {"alpha": 0.1}
    assert get_spec("skew_reverse_kl", kind="token").defaults() == {"alpha": 0.1}
    assert get_spec("rkl", kind="token").defaults() == {}
    with pytest.raises(ValueError, match="unknown loss"):
        get_spec("nope", kind="token")


# ---------------------------------------------------------------------------------------------
# 5. Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mismatched_vocabulary(name):
    with pytest.raises(ValueError, match="vocabulary 100 but teacher_logits 120"):
        divergence(name)(torch.randn(2, 3, 100), torch.randn(2, 3, 120))


def test_mismatched_shapes_and_mask():
    with pytest.raises(ValueError, match="shape"):
        forward_kl(torch.randn(2, 3, 5), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        forward_kl(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        cross_entropy(torch.randn(2, 3, 5), torch.full((2, 3), 5))


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature(name, temperature):
    with pytest.raises(ValueError, match="temperature"):
        divergence(name)(torch.randn(2, 5), torch.randn(2, 5), temperature=temperature)


def test_bad_weights():
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    for beta in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            jsd(student, teacher, beta=beta)
    for loss in (skew_kl, skew_reverse_kl):
        for alpha in (1.0, -0.5):
            with pytest.raises(ValueError, match="alpha"):
                loss(student, teacher, alpha=alpha)
