"""Cross-tokenizer losses (distill/losses/cross_tokenizer.py): naive references, hand values, gradients, and
TRL GOLD's `ULDLoss` on the same inputs (under the `bench` extra: skipped without trl)."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from distill.losses import get_spec
from distill.losses.cross_tokenizer import alm, chunk_logprobs, chunk_rows, gold_hybrid, sorted_l1, uld


def naive_uld(student_logits, teacher_logits, student_mask, teacher_mask, ts=1.0, tt=1.0):
    total, pairs = 0.0, 0
    for b in range(student_logits.shape[0]):
        s_rows = [t for t in range(student_logits.shape[1]) if student_mask[b, t]]
        t_rows = [t for t in range(teacher_logits.shape[1]) if teacher_mask[b, t]]
        for s, t in zip(s_rows, t_rows):
            p = sorted(torch.softmax(student_logits[b, s].double() / ts, -1).tolist(), reverse=True)
            q = sorted(torch.softmax(teacher_logits[b, t].double() / tt, -1).tolist(), reverse=True)
            width = max(len(p), len(q))
            p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
            total += sum(abs(a - c) for a, c in zip(p, q))
            pairs += 1
    return total / max(pairs, 1)


def test_uld_hand_value_with_vocabularies_of_different_sizes():
    student = torch.log(torch.tensor([[[0.5, 0.5]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.3, 0.6]]]))  # sorted: .6 .3 .1 against .5 .5 0
    value = uld(student, teacher, torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool))
    assert value.item() == pytest.approx(0.1 + 0.2 + 0.1)


def test_uld_pairs_positions_in_order_and_truncates_to_the_shorter():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 7, 9, generator=generator, dtype=torch.float64)
    student_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    teacher_mask = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    value = uld(student, teacher, student_mask, teacher_mask, temperature=2.0, teacher_temperature=0.5)
    assert value.item() == pytest.approx(naive_uld(student, teacher, student_mask, teacher_mask, 2.0, 0.5), rel=1e-10)
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 1].abs().sum() > 0
    assert student.grad[0, 3].abs().sum() == 0  # the student's third row has no teacher partner
    assert get_spec("uld", kind="cross_token").params["teacher_temperature"].low == 0


def test_alm_hand_values_and_divergences():
    # equal chunk likelihoods: every divergence is at its minimum (0 for the KLs, H(y_T) for the cross-entropy)
    same = torch.tensor([-0.5, -3.0, -40.0])
    assert alm(same, same).item() == pytest.approx(0.0, abs=1e-12)
    # tau = 1, epsilon = 0: y_T = 0.5, y_S = 0.25 -> KL = .5 ln(.5/.25) + .5 ln(.5/.75)
    student, teacher = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    expected = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert alm(student, teacher, tau=1.0, epsilon=0.0).item() == pytest.approx(expected, rel=1e-6)
    reverse = 0.25 * math.log(0.5) + 0.75 * math.log(0.75 / 0.5)
    assert alm(student, teacher, tau=1.0, epsilon=0.0, divergence="binary_reverse_kl").item() == pytest.approx(
        reverse, rel=1e-6)
    entropy = -2 * 0.5 * math.log(0.5)
    assert alm(student, teacher, tau=1.0, epsilon=0.0, divergence="binary_ce").item() == pytest.approx(
        expected + entropy, rel=1e-6)


def test_alm_against_a_naive_reference_with_a_mask_and_finite_gradients_at_certain_chunks():
    generator = torch.Generator().manual_seed(1)
    student = (-torch.rand(12, generator=generator, dtype=torch.float64) * 30).requires_grad_()
    teacher = -torch.rand(12, generator=generator, dtype=torch.float64) * 30
    student.data[0], teacher[0] = 0.0, 0.0  # a chunk both sides are certain of: log(1 - y) must stay finite
    mask = torch.rand(12, generator=generator) > 0.3
    mask[0] = True
    value = alm(student, teacher, mask, tau=10.0)
    naive = 0.0
    for s, t, keep in zip(student.tolist(), teacher.tolist(), mask.tolist()):
        if keep:
            ys, yt = math.exp(min(s, 0) / 10 - 1e-6), math.exp(min(t, 0) / 10 - 1e-6)
            naive += yt * math.log(yt / ys) + (1 - yt) * math.log((1 - yt) / (1 - ys))
    assert value.item() == pytest.approx(naive / int(mask.sum()), rel=1e-8)
    value.backward()
    assert torch.isfinite(student.grad).all()


def test_chunk_logprobs_and_chunk_rows_against_loops():
    generator = torch.Generator().manual_seed(2)
    logprobs = torch.log_softmax(torch.randn(2, 6, 4, generator=generator, dtype=torch.float64), -1)
    tokens = torch.randint(0, 4, (2, 6), generator=generator)
    token_logprobs = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    chunk = torch.tensor([[-1, 0, 0, 1, -1, -1], [-1, -1, 0, 1, 1, 1]])
    sums = chunk_logprobs(token_logprobs, chunk, 3)
    rows, present = chunk_rows(logprobs, token_logprobs, chunk, 3)
    for b in range(2):
        for c in range(3):
            members = [t for t in range(6) if chunk[b, t] == c]
            assert bool(present[b, c]) == bool(members)
            if not members:
                assert sums[b, c] == 0
                continue
            assert sums[b, c].item() == pytest.approx(sum(token_logprobs[b, t].item() for t in members))
            prefix = sum(token_logprobs[b, t].item() for t in members[:-1])
            torch.testing.assert_close(rows[b, c], logprobs[b, members[-1]] + prefix)


def test_gold_hybrid_hand_value():
    student = torch.tensor([[0.5, 0.3, 0.2]])
    teacher = torch.tensor([[0.6, 0.1, 0.3]])
    # entry 0 matches entry 0; the rest: sorted (.3, .2) against (.3, .1) -> ULD 0.1
    total, matched, unmatched = gold_hybrid(student, teacher, torch.tensor([0]), torch.tensor([0]), beta=0.0)
    assert matched.item() == pytest.approx(0.6 * math.log(0.6 / 0.5))
    assert unmatched.item() == pytest.approx(0.1)
    assert total.item() == pytest.approx(matched.item() / 3 + unmatched.item() * 2 / 3)
    assert sorted_l1(student, teacher).item() == pytest.approx(0.1 + 0.1 + 0.0)


# ---- TRL GOLD's ULDLoss on the same inputs (bench extra) ------------------------------------------------

def trl_uld(**overrides):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                  uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                  use_extended_uld=False, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False,
                  uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    config.update(overrides)
    return SimpleNamespace(**config), ULDLoss


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(1, 5, 7, generator=generator, dtype=torch.float64)
    teacher = torch.randn(1, 6, 9, generator=generator, dtype=torch.float64)
    student_labels = torch.tensor([[-100, -100, 3, 4, -100]])
    teacher_labels = torch.tensor([[-100, 5, 6, 7, -100, -100]])
    return student, teacher, student_labels, teacher_labels


@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)])
def test_uld_equals_trls_uld_loss(temperatures):
    config, ULDLoss = trl_uld(uld_student_temperature=temperatures[0], uld_teacher_temperature=temperatures[1])
    student, teacher, student_labels, teacher_labels = inputs()
    theirs = ULDLoss(config)(student_logits=student, teacher_logits=teacher, student_labels=student_labels,
                             teacher_labels=teacher_labels, student_input_ids=student_labels.clamp(min=0),
                             teacher_input_ids=teacher_labels.clamp(min=0))
    # ours: shifted logits (row t predicts token t + 1), masks on the rows that predict completion tokens
    ours = uld(student[:, :-1], teacher[:, :-1], student_labels[:, 1:] != -100, teacher_labels[:, 1:] != -100,
               temperature=temperatures[0], teacher_temperature=temperatures[1])
    assert ours.item() == pytest.approx(float(theirs), rel=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gold_hybrid_equals_trls_hybrid_loss(beta):
    config, ULDLoss = trl_uld(uld_use_hybrid_loss=True, beta=beta)
    student, teacher, student_labels, teacher_labels = inputs(1)
    student_vocab = {"a": 0, "b": 1, "c": 2, "x": 3, "p": 4, "q": 5, "r": 6}
    teacher_vocab = {"b": 0, "a": 1, "y": 2, "c": 3, "z": 4, "s": 5, "t": 6, "u": 7, "v": 8}
    loss = ULDLoss(config, student_tokenizer=SimpleNamespace(get_vocab=lambda: student_vocab),
                   teacher_tokenizer=SimpleNamespace(get_vocab=lambda: teacher_vocab))
    theirs = loss(student_logits=student, teacher_logits=teacher, student_labels=student_labels,
                  teacher_labels=teacher_labels, student_input_ids=student_labels.clamp(min=0),
                  teacher_input_ids=teacher_labels.clamp(min=0))
    shared = sorted(set(student_vocab) & set(teacher_vocab))
    student_rows = torch.softmax(student[0, 1:3], -1)  # the two aligned rows, as in the ULD test above
    teacher_rows = torch.softmax(teacher[0, 0:2], -1)
    total, matched, unmatched = gold_hybrid(student_rows, teacher_rows,
                                            torch.tensor([student_vocab[k] for k in shared]),
                                            torch.tensor([teacher_vocab[k] for k in shared]), beta=beta)
    assert total.item() == pytest.approx(float(theirs), rel=1e-9)


def test_alm_merging_and_debiasing_against_a_naive_reference():
    """Chunks merge into groups closed where the teacher's boundary probability passes the threshold; each group
    then gains each side's boundary log-probability (tokenkit's merge_by_space_prob + append_space)."""
    student = torch.tensor([[-0.5, -1.0, -2.0, -0.3]], dtype=torch.float64)
    teacher = torch.tensor([[-0.4, -1.5, -1.0, -0.2]], dtype=torch.float64)
    student_boundary = torch.log(torch.tensor([[0.2, 0.6, 0.3, 0.5]], dtype=torch.float64))
    teacher_boundary = torch.log(torch.tensor([[0.05, 0.5, 0.02, 0.3]], dtype=torch.float64))
    value = alm(student, teacher, tau=2.0, epsilon=0.0, debias=True, merge_threshold=0.1,
                student_boundary=student_boundary, teacher_boundary=teacher_boundary)
    naive = 0.0
    for group in ([0, 1], [2, 3]):  # closed by chunk 1 (0.5 > 0.1) and chunk 3 (0.3 > 0.1)
        s = sum(student[0, k].item() for k in group) + student_boundary[0, group[-1]].item()
        t = sum(teacher[0, k].item() for k in group) + teacher_boundary[0, group[-1]].item()
        ys, yt = math.exp(s / 2), math.exp(t / 2)
        naive += yt * math.log(yt / ys) + (1 - yt) * math.log((1 - yt) / (1 - ys))
    assert value.item() == pytest.approx(naive / 2, rel=1e-10)
    # without merging, debias only: four chunks
    plain = alm(student, teacher, tau=2.0, epsilon=0.0, debias=True, student_boundary=student_boundary,
                teacher_boundary=teacher_boundary)
    unbiased = alm(student + student_boundary, teacher + teacher_boundary, tau=2.0, epsilon=0.0)
    assert plain.item() == pytest.approx(unbiased.item(), rel=1e-12)
    with pytest.raises(ValueError, match="boundary"):
        alm(student, teacher, debias=True)
