"""Tests for distill.losses.classic: naive references, hand-computed values, gradcheck, properties, bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import HAND_STUDENT, HAND_TEACHER
from distill.losses import forward_kl, get_spec, specs
from distill.losses.classic import (
    dkd, dkd_warmup, hinton_kd, kd_decomposition, nckd, nkd, ofa_loss, plackett_luce_loss, pld, standardize_logits,
    tckd,
)

torch.set_num_threads(1)

# The teacher-based terms of classic_kd.py and classic_targets.py (`ce` and `bdkd`, also classifier terms, are
# tested in test_losses_registry.py and test_losses_ensemble.py).
CLASSIC_NAMES = [spec.name for spec in specs("classifier") if spec.fn.__module__ in (hinton_kd.__module__,
                                                                                       pld.__module__)]


def classifier_loss(name: str):
    """The registered classifier term `name`."""
    return get_spec(name, kind="classifier").fn

NUM_EXAMPLES, NUM_CLASSES = 7, 11  # odd on purpose


def _inputs(num_examples=NUM_EXAMPLES, num_classes=NUM_CLASSES, dtype=torch.float64, seed=0, requires_grad=True):
    """(student logits, teacher logits, labels): logits ~ 3 N(0, 1), labels uniform over the classes."""
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(num_examples, num_classes, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (3 * torch.randn(num_examples, num_classes, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, num_classes, (num_examples,), generator=generator)
    return student.requires_grad_(requires_grad), teacher.requires_grad_(requires_grad), labels


# ---------------------------------------------------------------------------------------------
# Naive references: one example at a time, Python loops over classes, float64, written from the papers'
# formulas with probabilities (not log-softmax), renormalising by division. Built from torch scalars so
# autograd gives reference gradients.
# ---------------------------------------------------------------------------------------------

def _softmax(row, temperature=1.0):
    top = max(float(value.detach()) for value in row) / temperature
    exps = [torch.exp(row[c] / temperature - top) for c in range(len(row))]
    total = sum(exps)
    return [value / total for value in exps]


def _kl(p, q):
    return sum(p[c] * torch.log(p[c] / q[c]) for c in range(len(p)))


def _standardized(row):
    mean = sum(row[c] for c in range(len(row))) / len(row)
    variance = sum((row[c] - mean) ** 2 for c in range(len(row))) / (len(row) - 1)  # Bessel, as torch.std
    return [(row[c] - mean) / (torch.sqrt(variance) + 1e-7) for c in range(len(row))]


def _naive_example(name, s, t, y, temperature, params):
    raw_student = s  # the CE term of KD sees the raw logits, standardised or not
    if params.get("standardize"):
        s, t = _standardized(s), _standardized(t)
    if name == "kd":
        alpha = params.get("alpha", 0.9)
        p_s, p_t = _softmax(s, temperature), _softmax(t, temperature)
        return alpha * temperature ** 2 * _kl(p_t, p_s) - (1 - alpha) * torch.log(_softmax(raw_student)[y])
    if name in ("dkd", "tckd", "nckd"):
        p_s, p_t = _softmax(s, temperature), _softmax(t, temperature)
        others = [c for c in range(len(s)) if c != y]
        rest_s, rest_t = sum(p_s[c] for c in others), sum(p_t[c] for c in others)
        target_kl = _kl([p_t[y], rest_t], [p_s[y], rest_s])
        non_target_kl = _kl([p_t[c] / rest_t for c in others], [p_s[c] / rest_s for c in others])
        if name == "tckd":
            return temperature ** 2 * target_kl
        if name == "nckd":
            return temperature ** 2 * non_target_kl
        return temperature ** 2 * (params.get("alpha", 1.0) * target_kl + params.get("beta", 8.0) * non_target_kl)
    if name == "nkd":
        gamma = params.get("gamma", 1.5)
        target = -_softmax(t)[y] * torch.log(_softmax(s)[y])
        p_s, p_t = _softmax(s, temperature), _softmax(t, temperature)
        others = [c for c in range(len(s)) if c != y]
        rest_s, rest_t = sum(p_s[c] for c in others), sum(p_t[c] for c in others)
        cross_entropy = -sum((p_t[c] / rest_t) * torch.log(p_s[c] / rest_s) for c in others)
        return target + gamma * temperature ** 2 * cross_entropy
    if name == "pld":
        weights = _softmax(t, temperature)
        order = [y] + sorted((c for c in range(len(s)) if c != y), key=lambda c: (-float(t[c].detach()), c))
        total = 0.0
        for rank, chosen in enumerate(order):
            remaining = sum(torch.exp(s[c]) for c in order[rank:])
            total = total + weights[chosen] * (torch.log(remaining) - s[chosen])
        return total
    if name == "ofa":
        eps = params.get("eps", 1.0)
        p_s, p_t = _softmax(s, temperature), _softmax(t, temperature)
        weights = [(p_t[c] + 1) ** eps - 1 if c == y else p_t[c] ** eps for c in range(len(s))]
        return -sum(weights[c] * torch.log(p_s[c]) for c in range(len(s)))
    raise AssertionError(name)


def _naive(name, student, teacher, labels, temperature, **params):
    total = 0.0
    for i in range(student.shape[0]):
        s, t, y = list(student[i]), list(teacher[i]), int(labels[i])
        total = total + _naive_example(name, s, t, y, temperature, params)
    return total / student.shape[0]


FUNCTIONS = {**{name: classifier_loss(name) for name in CLASSIC_NAMES}, "tckd": tckd, "nckd": nckd}
DEFAULT_TEMPERATURE = {"kd": 4.0, "dkd": 4.0, "tckd": 4.0, "nckd": 4.0, "nkd": 1.0, "pld": 1.0, "ofa": 1.0}
CASES = [(name, {}) for name in FUNCTIONS] + [
    ("kd", {"temperature": 2.0, "alpha": 0.3}), ("kd", {"temperature": 2.0, "alpha": 0.7, "standardize": True}),
    ("kd", {"alpha": 1.0}),
    ("dkd", {"temperature": 1.5, "alpha": 0.5, "beta": 2.0}), ("dkd", {"temperature": 2.0, "standardize": True}),
    ("tckd", {"temperature": 1.7}), ("nckd", {"temperature": 0.8}),
    ("nkd", {"temperature": 2.5, "gamma": 0.7}),
    ("pld", {"temperature": 4.0}), ("pld", {"temperature": 0.5}),
    ("ofa", {"temperature": 2.0, "eps": 1.5}), ("ofa", {"eps": 1.2}),
]


def _case_id(case):
    name, params = case
    return name + "".join(f"-{key}={value}" for key, value in params.items())


# ---------------------------------------------------------------------------------------------
# 1. Against the naive reference, value and gradients, odd shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_naive_reference(case, dtype, tol):
    name, params = case
    student, teacher, labels = _inputs(dtype=dtype)
    loss = FUNCTIONS[name](student, teacher, labels, **params)
    assert loss.dim() == 0 and loss.dtype == dtype
    student_grad, teacher_grad = torch.autograd.grad(loss, (student, teacher))

    ref_student = student.detach().double().requires_grad_(True)
    ref_teacher = teacher.detach().double().requires_grad_(True)
    temperature = params.get("temperature", DEFAULT_TEMPERATURE[name])
    reference = _naive(name, ref_student, ref_teacher, labels, temperature,
                       **{key: value for key, value in params.items() if key != "temperature"})
    ref_student_grad, ref_teacher_grad = torch.autograd.grad(reference, (ref_student, ref_teacher))

    torch.testing.assert_close(loss.double(), reference, rtol=tol, atol=tol)
    torch.testing.assert_close(student_grad.double(), ref_student_grad, rtol=tol, atol=tol)
    torch.testing.assert_close(teacher_grad.double(), ref_teacher_grad, rtol=tol, atol=tol)


def test_standardize_matches_naive_reference():
    logits, _, _ = _inputs(requires_grad=False)
    expected = torch.stack([torch.stack(_standardized(list(row))) for row in logits])
    torch.testing.assert_close(standardize_logits(logits), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. Hand-computed values
# ---------------------------------------------------------------------------------------------
# Three classes, label 0: student logits [0, 0, 0] -> p_S = [1/3, 1/3, 1/3];
# teacher logits [ln 4, ln 3, 0] -> p_T = [4/8, 3/8, 1/8] = [.5, .375, .125]. T = 1.
THREE_STUDENT = torch.zeros(1, 3, dtype=torch.float64)
THREE_TEACHER = torch.log(torch.tensor([[4.0, 3.0, 1.0]], dtype=torch.float64))
LABEL_0 = torch.tensor([0])


def test_hand_computed_decomposition_and_dkd():
    kl, target_kl, non_target_kl, teacher_target = kd_decomposition(THREE_STUDENT, THREE_TEACHER, LABEL_0, 1.0)
    # KL = .5 ln(.5/(1/3)) + .375 ln(.375/(1/3)) + .125 ln(.125/(1/3))
    #    = .5 ln 1.5 + .375 ln 1.125 + .125 ln .375 = 0.202733 + 0.044169 - 0.122604 = 0.124298
    assert abs(kl.item() - 0.12429753579876021) < 1e-12
    # b^T = [.5, .5], b^S = [1/3, 2/3]: .5 ln 1.5 + .5 ln .75 = 0.202733 - 0.143841 = 0.058892
    assert abs(target_kl.item() - 0.05889151782819174) < 1e-12
    # p_hat^T = [.375, .125] / .5 = [.75, .25], p_hat^S = [.5, .5]: .75 ln 1.5 + .25 ln .5 = 0.304099 - 0.173287
    assert abs(non_target_kl.item() - 0.13081203594113697) < 1e-12
    assert teacher_target.item() == pytest.approx(0.5, abs=1e-15)
    # identity: 0.058892 + (1 - .5) * 0.130812 = 0.058892 + 0.065406 = 0.124298 = KL
    # DKD, T = 1: 1 * 0.058892 + 8 * 0.130812 = 0.058892 + 1.046496 = 1.105388
    assert abs(dkd(THREE_STUDENT, THREE_TEACHER, LABEL_0, temperature=1.0).item() - 1.1053878053572874) < 1e-12


def test_hand_computed_hinton_kd():
    # p_S = [.5, .5], p_T = [.75, .25], label 1, T = 1, alpha = .5:
    # KL = .75 ln 1.5 + .25 ln .5 = 0.130812; CE = -ln .5 = 0.693147; .5 * 0.130812 + .5 * 0.693147 = 0.411980
    loss = hinton_kd(HAND_STUDENT, HAND_TEACHER, torch.tensor([1]), temperature=1.0, alpha=0.5)
    assert abs(loss.item() - 0.41197960825054114) < 1e-6


def test_hand_computed_nkd():
    # target: -p^T_0 ln p^S_0 = -.5 ln(1/3) = 0.549306
    # non-target: N(p^T) = [.75, .25], N(p^S) = [.5, .5]; -1.5 * (.75 ln .5 + .25 ln .5) = 1.5 ln 2 = 1.039721
    # total 0.549306 + 1.039721 = 1.589027
    assert abs(nkd(THREE_STUDENT, THREE_TEACHER, LABEL_0).item() - 1.5890269151739727) < 1e-12


def test_hand_computed_pld():
    # label 1 (not the teacher's top class): permutation (1, 0, 2); weights q^T at those ranks (.375, .5, .125).
    # student logits [ln 2, 0, 0], exp = [2, 1, 1]:
    # rank 0, class 1: -0 + ln(1 + 2 + 1) = ln 4 = 1.386294; rank 1, class 0: -ln 2 + ln(2 + 1) = ln 1.5 = 0.405465
    # rank 2, class 2: -0 + ln 1 = 0.  Loss = .375 * 1.386294 + .5 * 0.405465 = 0.519860 + 0.202733 = 0.722593
    student = torch.log(torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64))
    assert abs(pld(student, THREE_TEACHER, torch.tensor([1])).item() - 0.7225929394740411) < 1e-12


def test_hand_computed_ofa():
    # p_S = [.5, .5], p_T = [.75, .25], label 0, eps = 2: weights (1.75^2 - 1, .25^2) = (2.0625, .0625)
    # -(2.0625 ln .5 + .0625 ln .5) = 2.125 ln 2 = 1.472938
    assert abs(ofa_loss(HAND_STUDENT, HAND_TEACHER, LABEL_0, eps=2.0).item() - 1.4729377586898837) < 1e-6


def test_hand_computed_standardize():
    # [1, 2, 3]: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]; population std sqrt(2/3) -> +-1.224745
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(standardize_logits(logits, eps=0.0),
                               torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(standardize_logits(logits, eps=0.0, unbiased=False),
                               torch.tensor([[-1.5 ** 0.5, 0.0, 1.5 ** 0.5]], dtype=torch.float64))


def test_dkd_warmup():
    assert dkd_warmup(0, 20) == 0.0 and dkd_warmup(5, 20) == 0.25 and dkd_warmup(20, 20) == 1.0
    assert dkd_warmup(45, 20) == 1.0 and dkd_warmup(3, 0) == 1.0


# ---------------------------------------------------------------------------------------------
# 3. gradcheck, float64, tiny inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [(name, {}) for name in FUNCTIONS] + [
    ("kd", {"standardize": True, "temperature": 2.0, "alpha": 0.5}), ("dkd", {"standardize": True}),
    ("nkd", {"temperature": 2.0}), ("pld", {"temperature": 2.0}), ("ofa", {"eps": 1.5, "temperature": 1.3}),
], ids=_case_id)
def test_gradcheck(case):
    name, params = case
    student, teacher, labels = _inputs(2, 4, seed=1)
    assert torch.autograd.gradcheck(lambda s, t: FUNCTIONS[name](s, t, labels, **params), (student, teacher))


def test_gradcheck_plackett_luce_and_standardize():
    student, _, _ = _inputs(2, 4, seed=2)
    permutation = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    weights = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, w: plackett_luce_loss(s, permutation, w), (student, weights))
    assert torch.autograd.gradcheck(standardize_logits, (student,))


# ---------------------------------------------------------------------------------------------
# 4. Properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [
    ("kd", {"alpha": 1.0}), ("kd", {"alpha": 1.0, "standardize": True}), ("dkd", {}),
    ("dkd", {"standardize": True}), ("tckd", {}), ("nckd", {}),
])
def test_zero_for_identical_inputs(name, params):
    student, _, labels = _inputs()
    assert abs(FUNCTIONS[name](student, student.detach().clone(), labels, **params).item()) < 1e-12


def test_nkd_and_ofa_floor_for_identical_inputs():
    # NKD's non-target term and OFA (eps = 1) are cross-entropies: at student = teacher they equal entropies.
    logits, _, labels = _inputs(requires_grad=False)
    probs, temperature = torch.softmax(logits, -1), 2.0
    target = probs.gather(-1, labels[:, None]).squeeze(-1)
    non_target = torch.softmax(logits / temperature, -1).scatter(-1, labels[:, None], 0.0)
    non_target = non_target / non_target.sum(-1, keepdim=True)
    entropy = -(non_target * torch.log(non_target.where(non_target > 0, 1.0))).sum(-1)
    expected_nkd = (-target * torch.log(target) + 1.5 * temperature ** 2 * entropy).mean()
    torch.testing.assert_close(nkd(logits, logits, labels, temperature=temperature), expected_nkd)
    soft = torch.softmax(logits / temperature, -1)
    torch.testing.assert_close(ofa_loss(logits, logits, labels, temperature=temperature),
                               -(soft * torch.log(soft)).sum(-1).mean())


def test_ofa_with_eps_one_is_soft_cross_entropy_whatever_the_labels():
    student, teacher, labels = _inputs()
    teacher_entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum(-1).mean()
    soft_ce = forward_kl(student, teacher) + teacher_entropy  # H(p, q) = KL(p || q) + H(p)
    torch.testing.assert_close(ofa_loss(student, teacher, labels), soft_ce)
    torch.testing.assert_close(ofa_loss(student, teacher, (labels + 3) % NUM_CLASSES), soft_ce)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_dkd_identity_per_example(temperature):
    student, teacher, labels = _inputs(seed=4, requires_grad=False)
    teacher[0, labels[0]] += 40.0  # a teacher sure of the target: p_T ~ 1 - 1e-17, NCKD weight ~ 0
    kl, target_kl, non_target_kl, teacher_target = kd_decomposition(student, teacher, labels, temperature)
    assert kl.shape == (NUM_EXAMPLES,)
    torch.testing.assert_close(kl, target_kl + (1 - teacher_target) * non_target_kl, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(non_target_kl).all() and (non_target_kl >= 0).all() and (target_kl >= 0).all()


def test_dkd_is_weighted_sum_of_tckd_and_nckd():
    student, teacher, labels = _inputs()
    expected = (0.5 * tckd(student, teacher, labels, temperature=3.0)
                + 2.0 * nckd(student, teacher, labels, temperature=3.0))
    torch.testing.assert_close(dkd(student, teacher, labels, temperature=3.0, alpha=0.5, beta=2.0), expected,
                               rtol=1e-12, atol=1e-12)


def test_hinton_kd_endpoints():
    student, teacher, labels = _inputs()
    # alpha = 1, no labels: T^2 * KL, as torch's kl_div and the LM forward_kl
    expected = 16 * F.kl_div(F.log_softmax(student / 4, -1), F.log_softmax(teacher / 4, -1), log_target=True,
                             reduction="batchmean")
    torch.testing.assert_close(hinton_kd(student, teacher, None, alpha=1.0), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hinton_kd(student, teacher, None, alpha=1.0),
                               16 * forward_kl(student, teacher, temperature=4.0), rtol=1e-12, atol=1e-12)
    # alpha = 0: plain cross-entropy
    torch.testing.assert_close(hinton_kd(student, teacher, labels, alpha=0.0), F.cross_entropy(student, labels),
                               rtol=1e-12, atol=1e-12)
    # T^2 scaling: KD at T equals T^2 times KD at 1 on logits / T
    torch.testing.assert_close(hinton_kd(student, teacher, alpha=1.0, temperature=2.0),
                               4 * hinton_kd(student / 2, teacher / 2, alpha=1.0, temperature=1.0))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_invariant_to_per_row_shift(case):
    name, params = case
    student, teacher, labels = _inputs()
    generator = torch.Generator().manual_seed(5)
    shifted = FUNCTIONS[name](student + 5 * torch.randn(NUM_EXAMPLES, 1, generator=generator, dtype=torch.float64),
                              teacher - 7 * torch.randn(NUM_EXAMPLES, 1, generator=generator, dtype=torch.float64),
                              labels, **params)
    assert abs(shifted.item() - FUNCTIONS[name](student, teacher, labels, **params).item()) < 1e-10


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardized_losses_ignore_logit_scale(name):
    student, teacher, labels = _inputs()
    scale = torch.rand(NUM_EXAMPLES, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 5 + 0.2
    kwargs = {"standardize": True, "alpha": 1.0} if name == "kd" else {"standardize": True}
    loss = classifier_loss(name)(student, teacher, labels, **kwargs)
    rescaled = classifier_loss(name)(student * scale, teacher / scale, labels, **kwargs)
    assert abs(rescaled.item() - loss.item()) < 1e-6
    same_standardized = classifier_loss(name)(standardize_logits(student), standardize_logits(teacher), labels,
                                              **{**kwargs, "standardize": False})
    assert abs(same_standardized.item() - loss.item()) < 1e-12


def test_standardized_logits_have_mean_zero_and_std_one():
    logits = 3 * torch.randn(3, 5, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 4
    standardized = standardize_logits(logits, eps=0.0)
    torch.testing.assert_close(standardized.mean(-1), torch.zeros(3, 5, dtype=torch.float64))
    torch.testing.assert_close(standardized.std(-1), torch.ones(3, 5, dtype=torch.float64))
    population = standardize_logits(logits, eps=0.0, unbiased=False)
    torch.testing.assert_close(population.std(-1, correction=0), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(standardize_logits(2.5 * logits - 1.0, eps=0.0), standardized)
    assert standardize_logits(logits.bfloat16()).dtype == torch.float32


def test_pld_with_one_hot_weights_is_cross_entropy():
    student, _, labels = _inputs()
    generator = torch.Generator().manual_seed(8)
    rows = []
    for label in labels.tolist():  # the label first, the rest in a random order
        rest = [c for c in torch.randperm(NUM_CLASSES, generator=generator).tolist() if c != label]
        rows.append([label] + rest)
    permutation = torch.tensor(rows)
    one_hot_rank_0 = F.one_hot(torch.zeros(NUM_EXAMPLES, dtype=torch.long), NUM_CLASSES).double()
    torch.testing.assert_close(plackett_luce_loss(student, permutation, one_hot_rank_0),
                               F.cross_entropy(student, labels), rtol=1e-12, atol=1e-12)
    # the same through pld: a teacher whose softmax is one-hot on the label
    teacher = torch.full((NUM_EXAMPLES, NUM_CLASSES), -1e4, dtype=torch.float64).scatter(-1, labels[:, None], 0.0)
    torch.testing.assert_close(pld(student, teacher, labels), F.cross_entropy(student, labels), rtol=1e-12, atol=1e-12)


def test_pld_is_at_least_its_weighted_cross_entropy_term():
    # every rank's term is >= 0, and rank 0 is q^T_y * CE
    student, teacher, labels = _inputs()
    teacher_target = torch.softmax(teacher, -1).gather(-1, labels[:, None]).squeeze(-1)
    ce = F.cross_entropy(student, labels, reduction="none")
    assert pld(student, teacher, labels).item() >= (teacher_target * ce).mean().item()


@pytest.mark.parametrize("name", CLASSIC_NAMES)
def test_bf16_computes_in_float32(name):
    student, teacher, labels = _inputs(dtype=torch.bfloat16)
    loss = classifier_loss(name)(student, teacher, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, classifier_loss(name)(student.float(), teacher.float(), labels),
                               rtol=1e-6, atol=1e-6)
    (student_grad,) = torch.autograd.grad(loss, (student,))
    assert student_grad.dtype == torch.bfloat16 and torch.isfinite(student_grad.float()).all()


def test_registry_is_complete():
    assert CLASSIC_NAMES == ["kd", "dkd", "nkd", "pld", "ofa"]
    for name in CLASSIC_NAMES:
        spec = get_spec(name, kind="classifier")
        assert spec.formula and spec.paper and spec.needs_teacher
    assert classifier_loss("dkd") is dkd and classifier_loss("kd") is hinton_kd and classifier_loss("ofa") is ofa_loss
    assert get_spec("dkd", kind="classifier").defaults() == {"temperature": 4.0, "alpha": 1.0, "beta": 8.0,
                                                             "standardize": False}
    assert get_spec("kd", kind="classifier").defaults() == {"temperature": 4.0, "alpha": 0.9, "standardize": False}
    assert get_spec("nkd", kind="classifier").defaults() == {"temperature": 1.0, "gamma": 1.5}
    assert get_spec("pld", kind="classifier").defaults() == {"temperature": 1.0}
    assert get_spec("ofa", kind="classifier").defaults() == {"temperature": 1.0, "eps": 1.0}
    with pytest.raises(ValueError, match="kd, dkd, nkd, pld, ofa"):
        get_spec("fitnet", kind="classifier")


# ---------------------------------------------------------------------------------------------
# 5. Bad input: ValueError naming the argument
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    student, teacher, labels = _inputs(requires_grad=False)
    return [
        ("teacher_logits", lambda: dkd(student, teacher[:, :5], labels)),
        ("student_logits", lambda: nkd(student[0], teacher[0], labels[:1])),
        ("student_logits", lambda: pld(student.long(), teacher, labels)),
        ("C >= 2", lambda: ofa_loss(student[:, :1], teacher[:, :1], torch.zeros(NUM_EXAMPLES, dtype=torch.long))),
        ("N = 0", lambda: hinton_kd(student[:0], teacher[:0], labels[:0])),
        ("labels", lambda: dkd(student, teacher, labels[:3])),
        ("labels", lambda: dkd(student, teacher, labels.float())),
        ("labels", lambda: nkd(student, teacher, labels + NUM_CLASSES)),
        ("labels", lambda: pld(student, teacher, torch.full_like(labels, -100))),
        *[("labels is None", lambda fn=fn: fn(student, teacher, None)) for fn in (dkd, nkd, pld, ofa_loss)],
        ("labels is None", lambda: hinton_kd(student, teacher, None, alpha=0.5)),
        ("labels is None", lambda: kd_decomposition(student, teacher, None)),
        ("temperature", lambda: hinton_kd(student, teacher, labels, temperature=0.0)),
        ("temperature", lambda: dkd(student, teacher, labels, temperature=-1.0)),
        ("temperature", lambda: pld(student, teacher, labels, temperature=float("nan"))),
        ("temperature", lambda: tckd(student, teacher, labels, temperature=0.0)),
        ("alpha", lambda: hinton_kd(student, teacher, labels, alpha=1.5)),
        ("alpha", lambda: dkd(student, teacher, labels, alpha=-0.1)),
        ("beta", lambda: dkd(student, teacher, labels, beta=float("inf"))),
        ("gamma", lambda: nkd(student, teacher, labels, gamma=-1.0)),
        ("eps", lambda: ofa_loss(student, teacher, labels, eps=0.0)),
        ("eps", lambda: standardize_logits(student, eps=-1.0)),
        ("standardize", lambda: dkd(student, teacher, labels, standardize="yes")),
        ("logits", lambda: standardize_logits(student[:, :1])),
        ("permutation", lambda: plackett_luce_loss(student, torch.zeros_like(labels)[:, None].expand(-1, NUM_CLASSES),
                                                   torch.ones_like(student))),
        ("permutation", lambda: plackett_luce_loss(student, torch.arange(NUM_CLASSES).float().expand(NUM_EXAMPLES, -1),
                                                   torch.ones_like(student))),
        ("weights", lambda: plackett_luce_loss(student, torch.arange(NUM_CLASSES).expand(NUM_EXAMPLES, -1),
                                               -torch.ones_like(student))),
        ("weights", lambda: plackett_luce_loss(student, torch.arange(NUM_CLASSES).expand(NUM_EXAMPLES, -1),
                                               torch.ones(NUM_EXAMPLES, 3, dtype=torch.float64))),
        ("warmup_steps", lambda: dkd_warmup(3, -1)),
        ("step", lambda: dkd_warmup(-1, 10)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_the_argument(index):
    expected, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        call()
