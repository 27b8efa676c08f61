"""Tests for distill.losses.features: naive references, hand-computed values, gradcheck, properties, bad input."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.losses import get_spec, specs
from distill.losses.features import (
    attention_transfer, cka_loss, class_means, cosine_feature, fitnets, linear_cka, nd_loss,
    rkd_angle, rkd_distance,
)
from distill.losses.projectors import ConvProjector, LinearProjector, make_projector

torch.set_num_threads(1)

# The feature terms fn(student_features, teacher_features, **params); not nd, which takes the teacher's class means
# and the labels (its spec says needs_class_means).
PAIRWISE_NAMES = [spec.name for spec in specs("feature") if not spec.needs_class_means]


def feature_loss(name: str):
    """The registered feature term `name`."""
    return get_spec(name, kind="feature").fn


def _randn(*shape, seed=0, dtype=torch.float64, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# Naive references: explicit loops over examples, positions, pairs, triplets; float64
# ---------------------------------------------------------------------------------------------

def _dot(a, b):
    return sum(a[k] * b[k] for k in range(len(a)))


def _norm(a):
    return torch.sqrt(_dot(a, a))


def _huber(x):
    return 0.5 * x * x if abs(x.item()) <= 1 else abs(x) - 0.5


def _naive_fitnets(s, t):
    s_flat, t_flat = s.reshape(-1), t.reshape(-1)
    return sum((s_flat[k] - t_flat[k]) ** 2 for k in range(len(s_flat))) / len(s_flat)


def _vectors_at_positions(x):
    """The feature vectors of x, one per (example, position): channels for maps, last dim otherwise."""
    if x.dim() == 4:
        return [[x[n, :, h, w] for h in range(x.shape[2]) for w in range(x.shape[3])] for n in range(x.shape[0])]
    if x.dim() == 3:
        return [[x[n, l] for l in range(x.shape[1])] for n in range(x.shape[0])]
    return [[x[n]] for n in range(x.shape[0])]


def _naive_cosine(s, t):
    terms = []
    for s_example, t_example in zip(_vectors_at_positions(s), _vectors_at_positions(t)):
        for a, b in zip(s_example, t_example):
            terms.append(1 - _dot(a, b) / (_norm(a) * _norm(b)))
    return sum(terms) / len(terms)


def _naive_attention(s, t, p=2.0):
    total = 0
    for s_example, t_example in zip(_vectors_at_positions(s), _vectors_at_positions(t)):
        q_s = [sum(abs(a[c]) ** p for c in range(len(a))) for a in s_example]
        q_t = [sum(abs(b[c]) ** p for c in range(len(b))) for b in t_example]
        norm_s = torch.sqrt(sum(q * q for q in q_s))
        norm_t = torch.sqrt(sum(q * q for q in q_t))
        total = total + torch.sqrt(sum((q_s[k] / norm_s - q_t[k] / norm_t) ** 2 for k in range(len(q_s))))
    return total / s.shape[0]


def _naive_rkd_distance(s, t):
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = s.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    d_s = {pair: _norm(s[pair[0]] - s[pair[1]]) for pair in pairs}
    d_t = {pair: _norm(t[pair[0]] - t[pair[1]]) for pair in pairs}
    mu_s, mu_t = sum(d_s.values()) / len(pairs), sum(d_t.values()) / len(pairs)
    return sum(_huber(d_s[pair] / mu_s - d_t[pair] / mu_t) for pair in pairs) / len(pairs)


def _naive_rkd_angle(s, t):
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = s.shape[0]

    def cos_at(x, i, j, k):
        e_ij, e_kj = x[i] - x[j], x[k] - x[j]
        return _dot(e_ij, e_kj) / (_norm(e_ij) * _norm(e_kj))

    triplets = list(itertools.permutations(range(n), 3))
    return sum(_huber(cos_at(s, i, j, k) - cos_at(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def _naive_cka(s, t):
    x, y = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    n = x.shape[0]
    x = torch.stack([x[i] - sum(x[m] for m in range(n)) / n for i in range(n)])
    y = torch.stack([y[i] - sum(y[m] for m in range(n)) / n for i in range(n)])

    def frobenius_squared_of_product(a, b):  # ||a^T b||_F^2
        return sum(sum(a[i, p] * b[i, q] for i in range(n)) ** 2 for p in range(a.shape[1]) for q in range(b.shape[1]))

    return frobenius_squared_of_product(y, x) / torch.sqrt(
        frobenius_squared_of_product(x, x) * frobenius_squared_of_product(y, y))


def _naive_nd(s, means, labels, teacher_norms=None):
    total = 0
    for i in range(s.shape[0]):
        center = means[int(labels[i])]
        target = 0.0 if teacher_norms is None else teacher_norms[i]
        scale = _norm(s[i]) if _norm(s[i]) >= target else target
        total = total + 1 - _dot(s[i], center / _norm(center)) / scale
    return total / s.shape[0]


# Odd shapes; relational losses get different widths on the two sides.
NAIVE_CASES = [
    ("fitnets", fitnets, _naive_fitnets, (3, 4, 5, 6), (3, 4, 5, 6)),
    ("fitnets_tokens", fitnets, _naive_fitnets, (3, 5, 7), (3, 5, 7)),
    ("cosine_maps", cosine_feature, _naive_cosine, (3, 4, 5, 6), (3, 4, 5, 6)),
    ("cosine_tokens", cosine_feature, _naive_cosine, (3, 5, 7), (3, 5, 7)),
    ("cosine_vectors", cosine_feature, _naive_cosine, (5, 7), (5, 7)),
    ("attention_maps", attention_transfer, _naive_attention, (3, 4, 5, 6), (3, 7, 5, 6)),
    ("attention_tokens", attention_transfer, _naive_attention, (3, 5, 7), (3, 5, 9)),
    ("rkd_distance", rkd_distance, _naive_rkd_distance, (5, 7), (5, 9)),
    ("rkd_distance_maps", rkd_distance, _naive_rkd_distance, (4, 2, 3, 1), (4, 3, 2, 2)),
    ("rkd_angle", rkd_angle, _naive_rkd_angle, (5, 7), (5, 9)),
    ("cka_gram_form", cka_loss, lambda s, t: 1 - _naive_cka(s, t), (5, 7), (5, 9)),
    ("cka_feature_form", cka_loss, lambda s, t: 1 - _naive_cka(s, t), (11, 3), (11, 4)),
]


@pytest.mark.parametrize("name, loss_fn, naive_fn, student_shape, teacher_shape", NAIVE_CASES,
                         ids=[case[0] for case in NAIVE_CASES])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_naive_reference(name, loss_fn, naive_fn, student_shape, teacher_shape, dtype, tol):
    student = _randn(*student_shape, seed=1, dtype=dtype)
    teacher = _randn(*teacher_shape, seed=2, dtype=dtype)
    loss = loss_fn(student, teacher)
    assert loss.dim() == 0 and loss.dtype == dtype
    student_grad, teacher_grad = torch.autograd.grad(loss, (student, teacher))

    ref_student = student.detach().double().requires_grad_(True)
    ref_teacher = teacher.detach().double().requires_grad_(True)
    reference = naive_fn(ref_student, ref_teacher)
    ref_student_grad, ref_teacher_grad = torch.autograd.grad(reference, (ref_student, ref_teacher))

    assert abs(loss.item() - reference.item()) < tol
    torch.testing.assert_close(student_grad.double(), ref_student_grad, rtol=0, atol=tol)
    torch.testing.assert_close(teacher_grad.double(), ref_teacher_grad, rtol=0, atol=tol)


def test_attention_matches_naive_reference_with_other_p():
    student, teacher = _randn(2, 3, 4, 5, seed=3), _randn(2, 6, 4, 5, seed=4)
    for p in (1.0, 3.0):
        assert abs(attention_transfer(student, teacher, p=p).item()
                   - _naive_attention(student, teacher, p).item()) < 1e-10


def test_nd_matches_naive_reference():
    student, means = _randn(6, 7, seed=5), _randn(4, 7, seed=6)
    labels = torch.tensor([0, 3, 1, 1, 2, 3])
    teacher_norms = torch.tensor([0.5, 9.0, 1.0, 4.0, 0.1, 2.5], dtype=torch.float64)  # below and above ||s||
    for norms in (None, teacher_norms):
        loss = nd_loss(student, means, labels, norms)
        reference = _naive_nd(student, means, labels, None if norms is None else norms.tolist())
        assert abs(loss.item() - reference.item()) < 1e-12
        grad, = torch.autograd.grad(loss, student)
        ref_grad, = torch.autograd.grad(reference, student)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_class_means_matches_naive_loop():
    features, labels = _randn(9, 5, seed=7, requires_grad=False), torch.tensor([2, 0, 2, 1, 0, 2, 4, 1, 2])
    means = class_means(features, labels, num_classes=5)
    for k in range(5):
        members = [features[i] for i in range(9) if labels[i] == k]
        expected = sum(members) / len(members) if members else torch.zeros(5, dtype=torch.float64)  # class 3
        torch.testing.assert_close(means[k], expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------

def test_hand_computed_fitnets():
    # differences 0, 2, 3, 0 -> squares 0, 4, 9, 0 -> mean 13 / 4 = 3.25
    assert fitnets(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 4.0]])).item() == 3.25


def test_hand_computed_cosine():
    # cos([1, 0], [0, 1]) = 0 and cos([1, 1], [1, 1]) = 1 -> ((1 - 0) + (1 - 1)) / 2 = 0.5
    loss = cosine_feature(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert abs(loss.item() - 0.5) < 1e-7


def test_hand_computed_attention_with_different_channel_counts():
    # student: 1 channel, 1 x 2 map [1, 0] -> Q_S = [1, 0], already unit norm
    # teacher: 2 channels [1, 0] and [0, 1] -> Q_T = [1, 1] -> [1/sqrt2, 1/sqrt2]
    # ||Q_S - Q_T||^2 = 2 - 2 cos = 2 - sqrt2 = 0.585786 -> norm 0.765367 (not squared: the paper's eq. 2)
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert abs(attention_transfer(student, teacher).item() - math.sqrt(2 - math.sqrt(2))) < 1e-6


# student: collinear points 0, 1, 2 (D = 1); teacher: equilateral triangle of side 1 (D = 2)
HAND_COLLINEAR = torch.tensor([[0.0], [1.0], [2.0]])
HAND_TRIANGLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def test_hand_computed_rkd_distance():
    # student distances (01, 02, 12) = 1, 2, 1, mean 4/3 -> psi_S = .75, 1.5, .75; psi_T = 1, 1, 1
    # differences -.25, .5, -.25 -> huber 0.5 x^2 = .03125, .125, .03125 -> mean .1875 / 3 = .0625
    assert abs(rkd_distance(HAND_COLLINEAR, HAND_TRIANGLE).item() - 0.0625) < 1e-6


def test_hand_computed_rkd_angle():
    # student cosines at vertex j (two orderings each): j=0: +1, j=1: -1 (the points lie on both sides),
    # j=2: +1; teacher: every angle 60 deg, cos .5. differences .5 (x4) and -1.5 (x2):
    # huber .125 x 4 = .5 and (1.5 - .5) x 2 = 2 -> 2.5 / 6 = 0.416667
    assert abs(rkd_angle(HAND_COLLINEAR, HAND_TRIANGLE).item() - 2.5 / 6) < 1e-6


def test_hand_computed_cka():
    # X = [1, 2, 3]^T -> centred [-1, 0, 1]; Y = [[1, 0], [0, 1], [0, 0]] -> centred rows
    # [2/3, -1/3], [-1/3, 2/3], [-1/3, -1/3]. Y^T X = [-1, 0] -> ||.||^2 = 1; X^T X = 2;
    # Y^T Y = [[2/3, -1/3], [-1/3, 2/3]] -> ||.||_F = sqrt(10/9); CKA = 1 / (2 sqrt(10) / 3) = 0.474342
    similarity = linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert abs(similarity.item() - 3 / (2 * math.sqrt(10))) < 1e-6


def test_hand_computed_nd():
    # s1 = [3, 4] (norm 5), label 0, c0 = [1, 0]: projection 3; s2 = [0, 1] (norm 1), label 1, c1 = [0, 2]: 1
    # no teacher norm:          (1 - 3/5) + (1 - 1/1)          = .4 + 0  -> mean .2
    # teacher norms [10, 2]:    (1 - 3/max(5, 10)) + (1 - 1/max(1, 2)) = .7 + .5 -> mean .6
    # teacher norm 4 (scalar):  (1 - 3/5) + (1 - 1/4)           = .4 + .75 -> mean .575
    student, means = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    assert abs(nd_loss(student, means, labels).item() - 0.2) < 1e-6
    assert abs(nd_loss(student, means, labels, torch.tensor([10.0, 2.0])).item() - 0.6) < 1e-6
    assert abs(nd_loss(student, means, labels, 4.0).item() - 0.575) < 1e-6


def test_hand_computed_class_means():
    # class 0: mean of [1, 2], [3, 4] = [2, 3]; class 1: no examples -> zeros; class 2: [5, 6]
    means = class_means(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 0, 2]), 3)
    assert torch.equal(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]))


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, tiny inputs)
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ("fitnets", fitnets, (2, 3), (2, 3), {}),
    ("cosine_maps", cosine_feature, (2, 3, 2, 2), (2, 3, 2, 2), {}),
    ("attention_maps", attention_transfer, (2, 2, 2, 3), (2, 3, 2, 3), {}),
    ("attention_tokens_p3", attention_transfer, (2, 3, 2), (2, 3, 4), {"p": 3.0}),
    ("rkd_distance", rkd_distance, (4, 3), (4, 2), {}),
    ("rkd_angle", rkd_angle, (4, 3), (4, 2), {}),
    ("cka_gram_form", cka_loss, (3, 4), (3, 5), {}),
    ("cka_feature_form", cka_loss, (6, 2), (6, 3), {}),
]


@pytest.mark.parametrize("name, loss_fn, student_shape, teacher_shape, params", GRADCHECK_CASES,
                         ids=[case[0] for case in GRADCHECK_CASES])
def test_gradcheck(name, loss_fn, student_shape, teacher_shape, params):
    student, teacher = _randn(*student_shape, seed=8), _randn(*teacher_shape, seed=9)
    assert torch.autograd.gradcheck(lambda s, t: loss_fn(s, t, **params), (student, teacher))


def test_gradcheck_nd():
    student, means, labels = _randn(3, 4, seed=10), _randn(2, 4, seed=11), torch.tensor([1, 0, 1])
    norms = torch.tensor([0.5, 5.0, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, m, n: nd_loss(s, m, labels, n), (student, means, norms))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAIRWISE_NAMES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5, 6), (3, 5, 7)])
def test_zero_for_identical_inputs(name, shape):
    features = _randn(*shape, seed=12, requires_grad=False)
    if name == "attention" and len(shape) == 2:
        return  # vectors have no positions
    loss = feature_loss(name)(features, features.clone())
    assert abs(loss.item()) < 1e-12


def test_identical_attention_maps_have_a_finite_zero_gradient():
    features = _randn(3, 4, 5, 6, seed=13)
    grad, = torch.autograd.grad(attention_transfer(features, features.detach().clone()), features)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-12


def _random_rotation(width, seed):
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "cka"])
def test_relational_losses_invariant_to_rotation_and_scaling(name):
    student, teacher = _randn(6, 7, seed=14, requires_grad=False), _randn(6, 9, seed=15, requires_grad=False)
    loss_fn = feature_loss(name)
    base = loss_fn(student, teacher).item()
    assert base > 1e-3  # not trivially zero
    rotated = student @ _random_rotation(7, seed=16)
    assert abs(loss_fn(rotated, teacher).item() - base) < 1e-10
    assert abs(loss_fn(3.7 * student, teacher).item() - base) < 1e-10
    assert abs(loss_fn(student + 5.0, teacher).item() - base) < 1e-10  # translation too


def test_cka_of_features_with_themselves_is_one():
    features = _randn(8, 5, seed=17, requires_grad=False)
    assert abs(linear_cka(features, features).item() - 1.0) < 1e-12
    assert abs(linear_cka(features, features @ _random_rotation(5, 18) * 2.5).item() - 1.0) < 1e-12
    wide = _randn(4, 10, seed=19, requires_grad=False)  # the Gram form
    assert abs(linear_cka(wide, wide).item() - 1.0) < 1e-12


def test_cka_two_forms_agree():
    student, teacher = _randn(6, 5, seed=20, requires_grad=False), _randn(6, 5, seed=21, requires_grad=False)
    # 6 <= max(5, 7) picks the Gram form, 6 > max(5, 5) the feature form; padding with zero columns
    # changes nothing mathematically
    padded_teacher = torch.cat([teacher, torch.zeros(6, 2, dtype=torch.float64)], dim=1)
    assert abs(linear_cka(student, teacher).item() - linear_cka(student, padded_teacher).item()) < 1e-12


def test_attention_independent_of_channel_count():
    student = _randn(3, 4, 5, 6, seed=22, requires_grad=False)
    teacher = _randn(3, 7, 5, 6, seed=23, requires_grad=False)
    base = attention_transfer(student, teacher).item()
    assert abs(attention_transfer(torch.cat([student, student, student], dim=1), teacher).item() - base) < 1e-12
    tokens_student, tokens_teacher = _randn(2, 5, 3, seed=24), _randn(2, 5, 11, seed=25)
    assert abs(attention_transfer(torch.cat([tokens_student] * 2, dim=-1), tokens_teacher).item()
               - attention_transfer(tokens_student, tokens_teacher).item()) < 1e-12


def test_nd_norm_term():
    student, means = _randn(4, 6, seed=26, requires_grad=False), _randn(3, 6, seed=27, requires_grad=False)
    labels = torch.tensor([0, 1, 2, 1])
    # teacher_norm 0 is the plain direction loss 1 - cos(s, c_y), the same as None
    centers = means[labels]
    cosine = (student * centers).sum(-1) / (student.norm(dim=-1) * centers.norm(dim=-1))
    assert abs(nd_loss(student, means, labels).item() - (1 - cosine).mean().item()) < 1e-12
    assert abs(nd_loss(student, means, labels, 0.0).item() - (1 - cosine).mean().item()) < 1e-12
    # below the target norm, a longer student (same direction) has a lower loss when aligned
    aligned = centers / centers.norm(dim=-1, keepdim=True)
    target = 10.0
    losses = [nd_loss(scale * aligned, means, labels, target).item() for scale in (1.0, 4.0, 10.0, 20.0)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] == pytest.approx(0.0, abs=1e-12) and losses[3] == pytest.approx(0.0, abs=1e-12)


def test_compute_dtype():
    student, teacher = torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16)
    for name in PAIRWISE_NAMES:
        loss_fn = feature_loss(name)
        if name != "attention":
            assert loss_fn(student, teacher).dtype == torch.float32, name
    assert attention_transfer(student.view(5, 7, 1), teacher.view(5, 7, 1)).dtype == torch.float32
    assert fitnets(student.double(), teacher).dtype == torch.float64


def test_registry_tables():
    assert PAIRWISE_NAMES == ["fitnets", "cosine", "attention", "rkd_distance", "rkd_angle", "cka"]
    assert feature_loss("cka") is cka_loss and feature_loss("nd") is nd_loss
    assert [spec.name for spec in specs("feature") if spec.equal_shapes] == ["fitnets", "cosine", "nd"]
    assert all(spec.formula and spec.paper for spec in specs("feature"))
    for name in PAIRWISE_NAMES:  # losses whose spec does not say equal_shapes accept different widths
        if not get_spec(name, kind="feature").equal_shapes:
            shapes = ((4, 3, 5), (4, 3, 8)) if name == "attention" else ((4, 3), (4, 8))
            assert torch.isfinite(feature_loss(name)(torch.randn(*shapes[0]), torch.randn(*shapes[1])))


# ---------------------------------------------------------------------------------------------
# Projectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("student_shape, teacher_shape, kind", [
    ((7,), (9,), LinearProjector),
    ((5, 7), (5, 9), LinearProjector),
    ((3, 6, 6), (5, 6, 6), ConvProjector),
    ((3, 8, 6), (5, 4, 3), ConvProjector),  # pools the student map down to the teacher's size
    ((3, 8, 6), (3, 4, 3), ConvProjector),  # same channels, only the size differs
])
def test_projectors_produce_the_teacher_shape(student_shape, teacher_shape, kind):
    torch.manual_seed(0)
    projector = make_projector(student_shape, teacher_shape)
    assert isinstance(projector, kind)
    out = projector(torch.randn(4, *student_shape))
    assert out.shape == (4, *teacher_shape)
    fitnets(out, torch.randn(4, *teacher_shape)).backward()  # trainable with the student
    assert all(parameter.grad is not None for parameter in projector.parameters())


def test_conv_projector_options():
    plain = ConvProjector(3, 5, batch_norm=False)
    assert plain.conv.bias is not None and isinstance(plain.norm, torch.nn.Identity)
    assert make_projector((3, 4, 4), (5, 4, 4), batch_norm=False).conv.bias is not None
    with pytest.raises(ValueError, match="pooling only shrinks"):
        ConvProjector(3, 5, output_size=(8, 8))(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expects maps \[N, 3, H, W\]"):
        ConvProjector(3, 5)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"expects \[N, 7\]"):
        LinearProjector(7, 9)(torch.randn(2, 8))


def test_make_projector_none_on_equal_shapes():
    assert make_projector((7,), (7,)) is None
    assert make_projector(torch.Size([3, 4, 4]), [3, 4, 4]) is None


@pytest.mark.parametrize("student_shape, teacher_shape, message", [
    ((7,), (3, 4, 4), "different ranks"),
    ((5, 7), (6, 7), "different sequence lengths"),
    ((3, 4, 4), (5, 8, 8), "smaller map"),
    ((2, 3, 4, 4), (2, 3, 4, 5), r"expected a per-example shape"),
    ((0,), (3,), "positive sizes"),
])
def test_make_projector_refuses_impossible_shapes(student_shape, teacher_shape, message):
    with pytest.raises(ValueError, match=message):
        make_projector(student_shape, teacher_shape)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn", [fitnets, cosine_feature])
def test_pointwise_losses_need_equal_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"student_features has shape \(8, 32\) but teacher_features \(8, 64\): "
                                         r"add a projector \(projector: linear"):
        loss_fn(torch.randn(8, 32), torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"projector: conv"):
        loss_fn(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
def test_batch_sizes_must_match(name):
    with pytest.raises(ValueError, match="student_features has 4 examples but teacher_features 5"):
        feature_loss(name)(torch.randn(4, 3, 6), torch.randn(5, 3, 6))


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
def test_rank_is_checked(name):
    with pytest.raises(ValueError, match=r"student_features has shape \(4,\): expected \[N, D\]"):
        feature_loss(name)(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="teacher_features must be a Tensor"):
        feature_loss(name)(torch.randn(4, 3, 2), [[1.0]])


def test_attention_bad_inputs():
    with pytest.raises(ValueError, match=r"spatial size \(5, 6\) but teacher_features \(4, 6\)"):
        attention_transfer(torch.randn(3, 4, 5, 6), torch.randn(3, 4, 4, 6))
    with pytest.raises(ValueError, match="needs spatial positions"):
        attention_transfer(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="needs spatial positions"):
        attention_transfer(torch.randn(3, 4, 5), torch.randn(3, 4, 5, 1))
    with pytest.raises(ValueError, match="p must be a number > 0"):
        attention_transfer(torch.randn(3, 4, 5), torch.randn(3, 4, 5), p=0)


@pytest.mark.parametrize("loss_fn, minimum", [(rkd_distance, 2), (rkd_angle, 3), (cka_loss, 2)])
def test_relational_losses_need_enough_examples(loss_fn, minimum):
    with pytest.raises(ValueError, match=f"needs a batch of at least {minimum}"):
        loss_fn(torch.randn(minimum - 1, 3), torch.randn(minimum - 1, 5))


def test_nd_bad_inputs():
    student, means, labels = torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"student_features has width 5 but teacher_class_means 4: add a projector"):
        nd_loss(torch.randn(3, 5), means, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        nd_loss(student, means, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"labels must be an integer Tensor of shape \(3,\)"):
        nd_loss(student, means, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"zero row for classes \[1\]"):
        nd_loss(student, torch.stack([means[0], torch.zeros(4)]), labels)
    with pytest.raises(ValueError, match=r"teacher_norm must be a number or a Tensor of shape \(\) or \(3,\)"):
        nd_loss(student, means, labels, torch.ones(2))
    with pytest.raises(ValueError, match="teacher_norm must be >= 0"):
        nd_loss(student, means, labels, -1.0)
    with pytest.raises(ValueError, match=r"student_features must be \[N, D\]"):
        nd_loss(torch.randn(3, 2, 2), means, labels)
    with pytest.raises(ValueError, match="teacher_class_means must be"):
        nd_loss(student, torch.randn(4), labels)


def test_class_means_bad_inputs():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        class_means(torch.randn(3, 2), torch.tensor([0, 1, 0]), 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        class_means(torch.randn(3, 2), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"features must be \[N, D\]"):
        class_means(torch.randn(3), torch.tensor([0, 1, 0]), 2)
