"""Preference losses (distill.losses.preference): each against a naive reference in plain Python (loops over
pairs, positions and the vocabulary, math.log / math.exp) and a value computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import LossParameterError, check_params, get_spec
from distill.losses.preference import adpa_loss, dckd_loss, dpo_loss, redi_loss, sequence_logprobs


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _pairs(seed: int = 0, batch: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(batch, generator=generator, dtype=torch.float64) for _ in range(4)]


# ---- DPO ---------------------------------------------------------------------------------------------------

def test_dpo_by_hand():
    # h = (-1 + 1.5) - (-2 + 1.5) = 1; -log sigmoid(0.1) = log(1 + e^-0.1)
    value = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert value.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-7)
    assert value.item() == pytest.approx(0.6443966600735709, abs=1e-7)


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.0), (2.0, 0.2)])
def test_dpo_matches_a_naive_loop(beta, smoothing):
    chosen, rejected, ref_chosen, ref_rejected = _pairs(1)
    naive = 0.0
    for w, l, rw, rl in zip(chosen.tolist(), rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist()):
        h = beta * ((w - rw) - (l - rl))
        naive += -(1 - smoothing) * _logsig(h) - smoothing * _logsig(-h)
    got = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=smoothing)
    assert got.item() == pytest.approx(naive / len(chosen), rel=1e-12)


def test_dpo_pushes_the_chosen_up_and_the_rejected_down():
    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-3.0])).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises log pi(y_w), lowers log pi(y_l)
    assert chosen.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(-0) = -0.1 * 0.5


# ---- REDI --------------------------------------------------------------------------------------------------

def test_redi_by_hand():
    # -(-6 / 3) + 0.8 * (-8 / 4) = 2 - 1.6
    got = redi_loss(torch.tensor([-6.0]), torch.tensor([3]), torch.tensor([-8.0]), torch.tensor([4]))
    assert got.item() == pytest.approx(0.4)


def test_redi_matches_a_naive_loop_and_alpha_zero_is_sft():
    chosen, rejected, _, _ = _pairs(2)
    lengths_w, lengths_l = torch.tensor([1, 4, 7, 2, 9]), torch.tensor([3, 1, 5, 8, 2])
    naive = sum(-w / nw + 0.5 * l / nl for w, nw, l, nl in zip(chosen.tolist(), lengths_w.tolist(),
                                                                 rejected.tolist(), lengths_l.tolist())) / 5
    assert redi_loss(chosen, lengths_w, rejected, lengths_l, alpha=0.5).item() == pytest.approx(naive, rel=1e-12)
    sft = redi_loss(chosen, lengths_w, rejected, lengths_l, alpha=0.0)
    assert sft.item() == pytest.approx((-chosen / lengths_w).mean().item(), rel=1e-12)


# ---- DCKD and ADPA -----------------------------------------------------------------------------------------

def _logits(seed: int, batch: int = 2, length: int = 4, vocab: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)


def _naive_forward_kl_sum(student, teacher, mask) -> float:
    total = 0.0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[b][t]:
                p, q = _softmax(teacher[b][t].tolist()), _softmax(student[b][t].tolist())
                total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total


def test_dckd_matches_a_naive_loop_over_both_responses():
    s_w, t_w, s_l, t_l = (_logits(seed) for seed in range(4))
    mask_w = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask_l = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    naive = (0.7 * _naive_forward_kl_sum(s_w, t_w, mask_w) + 0.3 * _naive_forward_kl_sum(s_l, t_l, mask_l)) / 10
    got = dckd_loss(s_w, t_w, mask_w, s_l, t_l, mask_l, chosen_weight=0.7, rejected_weight=0.3)
    assert got.item() == pytest.approx(naive, rel=1e-10)
    same = dckd_loss(t_w, t_w, mask_w, t_l, t_l, mask_l)
    assert same.item() == pytest.approx(0.0, abs=1e-12)  # a student equal to the teacher pays nothing


def test_dckd_by_hand():
    # one position, two tokens: teacher (1/2, 1/2), student logits (log 3, 0) = (3/4, 1/4):
    # KL = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(4/3)
    teacher = torch.zeros(1, 1, 2)
    student = torch.tensor([[[math.log(3.0), 0.0]]])
    mask, none = torch.ones(1, 1), torch.zeros(1, 1)
    got = dckd_loss(student, teacher, mask, student, teacher, none)
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)


def test_adpa_matches_a_naive_loop_and_its_gradient_reaches_every_token():
    student, aligned, reference = (_logits(seed, vocab=6) for seed in (10, 11, 12))
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    naive, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b][t]:
                p_s = _softmax(student[b][t].tolist())
                p_a, p_r = _softmax(aligned[b][t].tolist()), _softmax(reference[b][t].tolist())
                naive -= sum(s * (math.log(a) - math.log(r)) for s, a, r in zip(p_s, p_a, p_r))
                count += 1
    assert adpa_loss(student, aligned, reference, mask).item() == pytest.approx(naive / count, rel=1e-10)
    leaf = student.clone().requires_grad_(True)
    adpa_loss(leaf, aligned, reference, mask).backward()
    assert (leaf.grad[0, 0] != 0).all() and (leaf.grad[0, 2] == 0).all()  # every vocabulary entry; masked: none
    assert adpa_loss(student, aligned, aligned, mask).item() == pytest.approx(0.0, abs=1e-12)  # no advantage


def test_adpa_by_hand_and_clipped():
    # student (3/4, 1/4); aligned (1/2, 1/2); reference (1/4, 3/4): A = (log 2, -log(3/2))
    student = torch.tensor([[[math.log(3.0), 0.0]]])
    aligned = torch.zeros(1, 1, 2)
    reference = torch.tensor([[[0.0, math.log(3.0)]]])
    mask = torch.ones(1, 1)
    expected = -(0.75 * math.log(2) - 0.25 * math.log(1.5))
    assert adpa_loss(student, aligned, reference, mask).item() == pytest.approx(expected, abs=1e-7)
    clipped = adpa_loss(student, aligned, reference, mask, advantage_clip=0.1)
    assert clipped.item() == pytest.approx(-(0.75 * 0.1 - 0.25 * 0.1), abs=1e-7)


def test_sequence_logprobs_sums_the_masked_tokens():
    logits = _logits(20, batch=1, length=3, vocab=4)
    labels = torch.tensor([[2, 0, 3]])
    mask = torch.tensor([[0, 1, 1]])
    rows = [_softmax(logits[0][t].tolist()) for t in range(3)]
    naive = math.log(rows[1][0]) + math.log(rows[2][3])
    assert sequence_logprobs(logits, labels, mask).item() == pytest.approx(naive, rel=1e-10)


# ---- the registry --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,field", [("dpo", {"beta": 0}, "objective.beta"),
                                               ("dpo", {"label_smoothing": 0.5}, "objective.label_smoothing"),
                                               ("redi", {"alpha": 1.5}, "objective.alpha"),
                                               ("dckd", {"chosen_weight": -1}, "objective.chosen_weight"),
                                               ("adpa", {"advantage_clip": float("inf")}, "objective.advantage_clip")])
def test_preference_parameters_are_checked_by_the_registry(name, params, field):
    with pytest.raises(LossParameterError) as caught:
        check_params(name, params, kind="preference")
    assert caught.value.field == field
    spec = get_spec(name, kind="preference")
    assert spec.inputs in ("sequence", "distribution") and spec.paper and spec.formula
