"""The token objective of a causal LM: kd_weight * divergence(student, teacher) + ce_weight * CE
+ entropy_weight * H(student), over the completion tokens, normalised by the valid tokens of the
whole accumulated batch. With no teacher (the `alone` row, `distill train-teacher`) it is CE only.

Two paths give the same values and gradients: the plain one materialises the micro-batch's logits;
the fused one (`distill.losses.fused`) takes the student's final hidden states and its head and
never holds full-vocabulary logits for all tokens. The teacher comes as a `TeacherSignal` (a live
forward, the cache's top-k, ...), already shifted to the student's positions.
"""
from __future__ import annotations

import torch

from distill.lm.data import IGNORE_INDEX, model_inputs
from distill.lm.recipe import ObjectiveSpec, TaidSpec
from distill.losses import TaidSchedule, cross_entropy, get_spec, select_tokens, student_entropy
from distill.losses.fused import TeacherSignal, fused_linear_distillation
from distill.losses.sparse import dense_teacher_logits, student_topk_tail_logits, teacher_topk_tail_logits

HARD_LABELS = ObjectiveSpec(kd_weight=0.0, ce_weight=1.0)  # no divergence term: its loss is never called


class TokenObjective:
    """One objective section of a recipe, made callable on a micro-batch (see the module docstring)."""

    def __init__(self, spec: ObjectiveSpec | None, *, vocab_size: int, memory_budget_bytes: int):
        self.spec = spec or HARD_LABELS
        self.vocab_size, self.memory_budget_bytes = vocab_size, memory_budget_bytes
        self.uses_teacher = self.spec.kd_weight > 0 and spec is not None
        self.divergence_spec = get_spec(self.spec.loss, kind="token")  # name, function and properties
        self.divergence = self.divergence_spec.fn
        self.params = self.spec.loss_params() if self.uses_teacher else {}
        self.taid = None
        if self.uses_teacher and self.spec.taid is not None:  # the recipe allows it for scheduled losses only
            taid = self.spec.taid
            self.taid = TaidSchedule(t_start=taid.t_start, t_end=taid.t_end, alpha=taid.alpha, beta=taid.beta,
                                     disable_adaptive=not taid.adaptive)
            self.params[TaidSpec.PARAMETER] = self.taid.t

    @property
    def fusable(self) -> bool:
        """Whether the chunked fused path can compute this objective (token-separable terms only)."""
        return (self.divergence_spec.token_separable and self.spec.entropy_weight == 0
                and self.spec.token_selection is None)

    # ---- one micro-batch -------------------------------------------------------------------------------

    def loss(self, student, batch: dict, teacher: TeacherSignal | None, num_valid_tokens: int) -> tuple[torch.Tensor, dict]:
        """(loss, unweighted parts) of a collated micro-batch; `student` is the trainer's StudentView."""
        inputs = model_inputs(batch)
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        mask = labels != IGNORE_INDEX
        if student.head is not None:
            return self._fused(student.hidden(**inputs)[:, :-1], student.head, labels, mask, teacher, num_valid_tokens)
        logits = student.logits(**inputs)[:, :-1, :self.vocab_size]
        spec, parts = self.spec, {}
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.uses_teacher:
            kd_logits, teacher_logits = self._plain_pair(logits, teacher)
            kd_mask, kd_count = mask, num_valid_tokens
            if spec.token_selection is not None:  # distil only the selected share of tokens (TSD-KD)
                kd_mask = select_tokens(kd_logits, teacher_logits, mask, ratio=spec.token_selection,
                                        temperature=spec.temperature)
                kd_count = max(1, round(num_valid_tokens * spec.token_selection))
            kd = self.divergence(kd_logits, teacher_logits, kd_mask, temperature=spec.temperature,
                                 num_valid_tokens=kd_count, **self.params)
            loss, parts["kd"] = loss + spec.kd_weight * kd, kd.item()
        if spec.ce_weight > 0:
            ce = cross_entropy(logits, labels, mask, num_valid_tokens=num_valid_tokens)
            loss, parts["ce"] = loss + spec.ce_weight * ce, ce.item()
        if spec.entropy_weight != 0:
            entropy = student_entropy(logits, mask, num_valid_tokens=num_valid_tokens)
            loss, parts["entropy"] = loss + spec.entropy_weight * entropy, entropy.item()
        parts["loss"] = loss.item()
        return loss, parts

    def divergence_value(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask,
                         num_valid_tokens: int) -> torch.Tensor:
        """The objective's divergence alone (regimes that pair tokens themselves, e.g. self-distillation)."""
        return self.divergence(student_logits, teacher_logits, mask, temperature=self.spec.temperature,
                               num_valid_tokens=num_valid_tokens, **self.params)

    def _plain_pair(self, logits: torch.Tensor, teacher: TeacherSignal) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits) in a form every divergence compares."""
        if teacher.logits is not None:
            return logits, teacher.logits[..., :self.vocab_size]
        if teacher.hidden is not None:
            bias = teacher.bias[:self.vocab_size] if teacher.bias is not None else None
            return logits, torch.nn.functional.linear(teacher.hidden, teacher.weight[:self.vocab_size], bias)
        if teacher.tail_logmass is not None:  # top-k + tail bucket: k + 1 outcomes on both sides
            return (student_topk_tail_logits(logits, teacher.topk_ids, self.spec.temperature),
                    teacher_topk_tail_logits(teacher.topk_logprobs, teacher.tail_logmass))
        return logits, dense_teacher_logits(teacher.topk_ids, teacher.topk_logprobs, self.vocab_size)

    def _fused(self, hidden, head, labels, mask, teacher, num_valid_tokens) -> tuple[torch.Tensor, dict]:
        """Hidden states + head, chunked: one pass computes the divergence and CE together."""
        spec, parts = self.spec, {}
        loss = fused_linear_distillation(
            hidden, head.weight, teacher if self.uses_teacher else None, labels=labels, mask=mask, loss=spec.loss,
            kd_weight=spec.kd_weight if self.uses_teacher else 0.0, ce_weight=spec.ce_weight,
            temperature=spec.temperature, student_bias=head.bias, vocab_size=self.vocab_size,
            num_valid_tokens=num_valid_tokens, memory_budget_bytes=self.memory_budget_bytes, parts=parts,
            **self.params)
        parts["loss"] = loss.item()
        return loss, parts

    # ---- state across steps (TAID's schedule of t) ----------------------------------------------------

    def end_step(self, kd_total: float, progress: float) -> None:
        """After an optimizer step: TAID sets next step's t from this step's divergence."""
        if self.taid is not None:
            self.params[TaidSpec.PARAMETER] = self.taid.update(kd_total, progress=progress)

    def state_dict(self) -> dict:
        return {"taid": self.taid.state_dict()} if self.taid is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.taid is not None and state.get("taid") is not None:
            self.taid.load_state_dict(state["taid"])
            self.params[TaidSpec.PARAMETER] = self.taid.t
