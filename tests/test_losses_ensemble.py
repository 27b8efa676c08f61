"""Multi-teacher combination and BD-KD's balanced divergence against naive references and hand values."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses.ensemble import balanced_divergence, balancing_temperature, combine_teachers

torch.set_num_threads(1)


def naive_balanced(student, teacher, temperature, gamma):
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        forward = sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
        reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t))
        h_s, h_t = -sum(s * math.log(s) for s in p_s), -sum(t * math.log(t) for t in p_t)
        a, b = (1.0, gamma) if h_s > h_t else (gamma, 1.0)
        total += temperature ** 2 * (a * forward + b * reverse)
    return total / len(student)


def test_balanced_divergence_matches_reference_and_hand_value():
    generator = torch.Generator().manual_seed(0)
    student = 2 * torch.randn(7, 11, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(7, 11, generator=generator, dtype=torch.float64)
    for temperature, gamma in ((1.0, 2.0), (3.0, 1.5), (0.5, 1.0)):
        ours = balanced_divergence(student, teacher, temperature=temperature, gamma=gamma)
        assert ours.item() == pytest.approx(naive_balanced(student, teacher, temperature, gamma), rel=1e-10)
    # p_S = [.5, .5] (entropy ln 2) is less confident than p_T = [.75, .25]: weights (1, gamma).
    # FKL = .75 ln 1.5 + .25 ln .5 = 0.130812; RKL = .5 ln(.5/.75) + .5 ln(.5/.25) = 0.143841
    # gamma 2: 0.130812 + 2 * 0.143841 = 0.418494
    hand = balanced_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), gamma=2.0)
    assert hand.item() == pytest.approx(0.418494, abs=1e-6)
    assert balanced_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)
    small = student[:3, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: balanced_divergence(s, teacher[:3, :4], temperature=2.0), (small,))
    with pytest.raises(ValueError, match="gamma"):
        balanced_divergence(student, teacher, gamma=0.5)


def test_combined_teachers_are_the_mixture_and_entropy_balanced_evens_out_entropies():
    generator = torch.Generator().manual_seed(1)
    sharp = 6 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    flat = 0.3 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    mean = combine_teachers([sharp, flat]).exp()
    assert torch.allclose(mean, (sharp.softmax(-1) + flat.softmax(-1)) / 2, atol=1e-6)
    # Hand: teachers [ln 3, 0] and [0, ln 3] -> probabilities (.75, .25) and (.25, .75): mean (.5, .5).
    hand = combine_teachers([torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0)]])]).exp()
    assert torch.allclose(hand, torch.tensor([[0.5, 0.5]]))

    def entropy(logits):
        p = logits.softmax(-1)
        return float(-(p * p.log()).sum(-1).mean())
    target = (entropy(sharp) + entropy(flat)) / 2
    for logits in (sharp, flat):
        temperature = balancing_temperature(logits, target)
        assert entropy(logits / temperature) == pytest.approx(target, abs=1e-4)
    balanced = combine_teachers([sharp, flat], mode="entropy_balanced").exp()
    assert torch.allclose(balanced.sum(-1), torch.ones(5, dtype=balanced.dtype), atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        combine_teachers([sharp], mode="max")
    with pytest.raises(ValueError, match="same"):
        combine_teachers([sharp, flat[:, :3]])
