"""The LM distillation loop on `accelerate` (off-policy: a live teacher, or its cached top-k).

One optimizer step reads top to bottom: take the step's micro-batches -> count valid tokens over
the whole accumulated batch (all processes) -> per micro-batch: student forward, teacher forward
under no_grad, divergence (+ hard-label CE) normalised by that count -> backward -> clip, step,
schedule -> log, eval, checkpoint. With no teacher the same loop trains on hard labels only
(the "alone" baseline and `distill train-teacher`).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from distill.lm.data import IGNORE_INDEX, BatchOrder, Example, collate
from distill.core.errors import DistillError
from distill.losses import TaidSchedule, cross_entropy, get_loss, select_tokens, student_entropy
from distill.losses.fused import TeacherSignal, fused_linear_distillation, not_token_separable
from distill.losses.sparse import dense_teacher_logits, student_topk_tail_logits, teacher_topk_tail_logits
from distill.lm.recipe import ObjectiveSpec, TrainSpec
from distill.core.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from distill.lm.regimes import (opd_samples, opd_step_loss, self_distill_examples, self_distill_loss,
                                    student_samples)

if TYPE_CHECKING:
    from distill.lm.teacher.cache.store import TeacherCache
    from distill.lm.regimes import OPD, OnPolicy, SelfDistill

# Testing aid: stop as if killed right after the checkpoint of this step (see tests/test_resume.py).
CRASH_AFTER_STEP_ENV = "DISTILL_CRASH_AFTER_STEP"


@dataclass
class Phase:
    """One training job inside a run: `distilled` (teacher given), `alone` or `teacher` (CE only)."""

    name: str
    checkpoint_dir: Path
    teacher: torch.nn.Module | None = None
    objective: ObjectiveSpec = field(default_factory=lambda: ObjectiveSpec(loss="forward_kl", kd_weight=0.0, ce_weight=1.0))
    # Instead of `teacher`: its stored top-k (distill/lm/teacher/cache), the cache row span of every training
    # example (by index), and how a sparse teacher meets the student ("tail" or "renormalize").
    cache: "TeacherCache | None" = None
    cache_spans: list[tuple[int, int]] | None = None
    sparse: str = "tail"
    # On-policy (GKD): with probability lmbda a micro-batch's completions are the student's samples.
    on_policy: "OnPolicy | None" = None
    # OPD: every micro-batch is student samples, trained by policy gradient on the teacher's reward.
    opd: "OPD | None" = None
    # OPSD: the teacher is the student itself, given privileged context before the prompt.
    self_distill: "SelfDistill | None" = None

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.cache is not None or self.self_distill is not None


class FinalHiddenStates(torch.nn.Module):
    """A causal LM up to its final (normed) hidden states: what DDP wraps on the fused path.
    The head's weight is used by the loss outside forward and still gets its gradient."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask):
        base = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def fused_head(model):
    """(base model, linear head) when logits are exactly head(base(x).last_hidden_state); else None
    (e.g. logit soft-capping or scaling, which the fused path would skip)."""
    if model is None:
        return None
    head, base = model.get_output_embeddings(), getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or base is None:
        return None
    config = model.config
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("final_logit_softcapping", "logit_scale",
                                                                        "logits_scaling", "output_multiplier_scale")):
        return None
    return base, head


def make_scheduler(optimizer, spec: TrainSpec):
    """Linear warmup, then cosine / linear decay to zero, or constant."""
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if spec.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LMTrainer:
    """Trains `student` for `spec.steps` optimizer steps; only the main process writes files."""

    def __init__(self, *, accelerator, student, phase: Phase, examples: list[Example], pad_token_id: int,
                 vocab_size: int, spec: TrainSpec, eval_every: int, evaluate: Callable[[torch.nn.Module], dict],
                 metrics_file: Path | None, losses_file: Path | None):
        self.accelerator, self.phase, self.spec = accelerator, phase, spec
        self.examples, self.pad_token_id, self.vocab_size = examples, pad_token_id, vocab_size
        self.eval_every, self.evaluate = eval_every, evaluate
        self.metrics_file, self.losses_file = metrics_file, losses_file
        self.divergence = get_loss(phase.objective.loss)
        self.loss_params = phase.objective.loss_params()
        optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = make_scheduler(optimizer, spec)  # stepped by us: once per optimizer step
        objective = phase.objective
        # The fused path runs the model up to its final hidden states and applies the head chunk
        # by chunk in the loss; terms that need a micro-batch's full logits take the plain path.
        # `engine` is what accelerate wraps (DDP), `model` the HF model (eval, checkpoints).
        plain_only = (self.divergence.__name__ in not_token_separable() or objective.entropy_weight != 0
                      or objective.token_selection is not None or phase.opd is not None
                      or phase.self_distill is not None)
        self.samples_itself = any(x is not None for x in (phase.on_policy, phase.opd, phase.self_distill))
        self.student_head = fused_head(student) if spec.fused_loss and not plain_only else None
        self.taid = None
        if phase.has_teacher and objective.taid is not None:
            taid = objective.taid
            self.taid = TaidSchedule(t_start=taid.t_start, t_end=taid.t_end, alpha=taid.alpha, beta=taid.beta,
                                     disable_adaptive=not taid.adaptive)
            self.loss_params["t"] = self.taid.t
        self.teacher_head = fused_head(phase.teacher) if self.student_head and phase.teacher is not None else None
        engine = FinalHiddenStates(student) if self.student_head else student
        self.model = student
        self.engine, self.optimizer = accelerator.prepare(engine, optimizer)
        if phase.teacher is not None:
            phase.teacher.to(accelerator.device).eval().requires_grad_(False)

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to `spec.steps`; returns the eval history (one dict per eval) of this phase."""
        spec, accelerator = self.spec, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        order = BatchOrder(len(self.examples), spec.seed)
        step, position, last_checkpoint = 0, 0, None
        if resume and (found := find_checkpoint(self.phase.checkpoint_dir)) is not None:
            state = load_checkpoint(found, model=self.model,
                                    optimizer=self.optimizer, scheduler=self.scheduler)
            step, position, last_checkpoint = state["step"], state["position"], state["step"]
            if self.taid is not None:
                self.taid.load_state_dict(state["taid"])
                self.loss_params["t"] = self.taid.t
        history = self._truncate_logs(step)
        crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))
        self.engine.train()
        progress = tqdm(total=spec.steps, initial=step, desc=self.phase.name, disable=not accelerator.is_main_process,
                        dynamic_ncols=True, leave=False)
        while step < spec.steps:
            started = time.perf_counter()
            micro_batches, timing = [], {"generate_seconds": 0.0, "generated_tokens": 0, "sampled_batches": 0}
            self.teacher_seconds = 0.0  # the teacher's share of the step (forward, or reading the cache)
            for micro in range(spec.grad_accum):
                indices = order.take(position, spec.batch_size * world)
                position += spec.batch_size * world
                mine = indices[rank * spec.batch_size:(rank + 1) * spec.batch_size]
                examples = [self.examples[i] for i in mine]
                advantages = None
                if self.phase.on_policy is not None:
                    examples = student_samples(self, examples, step, micro, rank, timing)
                elif self.phase.opd is not None:
                    examples, advantages = opd_samples(self, examples, step, micro, rank, timing)
                elif self.phase.self_distill is not None:
                    examples, teacher_examples = self_distill_examples(self, examples, step, micro, rank, timing)
                micro_batches.append(collate(examples, self.pad_token_id))
                if self.phase.self_distill is not None:
                    teacher_batch = collate(teacher_examples, self.pad_token_id)
                    micro_batches[-1].update({f"teacher_{k}": v for k, v in teacher_batch.items()})
                if advantages is not None:
                    micro_batches[-1]["sequence_advantage"] = advantages
                micro_batches[-1]["example_index"] = torch.tensor(mine, dtype=torch.long)
            # The loss is a mean over every valid token of the accumulated batch on all processes.
            local_valid = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
            num_valid_tokens = int(accelerator.reduce(torch.tensor(local_valid, device=accelerator.device), "sum"))
            totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "entropy": 0.0}
            for index, batch in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with nullcontext() if last else accelerator.no_sync(self.engine):
                    loss, parts = self._micro_batch_loss(batch, max(num_valid_tokens, 1))
                    # DDP averages gradients over processes; the loss is already a global mean.
                    accelerator.backward(loss * world)
                for key, value in parts.items():
                    totals[key] += value
            totals = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "sum")) for k, v in totals.items()}
            if self.taid is not None:  # t for the next step, from this step's loss (TAID's schedule)
                self.loss_params["t"] = self.taid.update(totals["kd"], progress=(step + 1) / spec.steps)
            grad_norm = self._clip()
            if not math.isfinite(totals["loss"]) or not math.isfinite(grad_norm):
                where = (f"the last good checkpoint is step {last_checkpoint} in {self.phase.checkpoint_dir}"
                         if last_checkpoint is not None else "no checkpoint was written yet")
                raise DistillError(f"{self.phase.name}: the loss became non-finite at step {step + 1} "
                                   f"(loss={totals['loss']}, grad norm={grad_norm}); training stopped and {where}",
                                   field="train.lr", fix="lower train.lr or raise objective.temperature, then run "
                                                         "again (with --resume to continue from the checkpoint)")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches) * world
            step_seconds = time.perf_counter() - started
            tokens_per_second = tokens / max(step_seconds, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{totals['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            if step % spec.log_every == 0 or step == spec.steps:
                self._append(self.losses_file, {"phase": self.phase.name, "step": step, **totals,
                                                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                                "fused_loss": self.student_head is not None,
                                                **(timing if self.samples_itself else {}),
                                                "tokens_per_second": tokens_per_second, "step_seconds": step_seconds,
                                                "teacher_seconds": self.teacher_seconds})
            if step % self.eval_every == 0 or step == spec.steps:
                history.append(self._run_eval(step))
            if step % spec.checkpoint_every == 0 or step == spec.steps:
                self._checkpoint(step, position)
                last_checkpoint = step
                if step == crash_after:
                    progress.close()
                    raise SystemExit(f"{CRASH_AFTER_STEP_ENV}={crash_after}: simulated crash after the checkpoint")
        progress.close()
        return history

    def _micro_batch_loss(self, batch: dict, num_valid_tokens: int) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        if self.phase.opd is not None:
            return opd_step_loss(self, batch, num_valid_tokens)
        if self.phase.self_distill is not None:
            return self_distill_loss(self, batch, num_valid_tokens)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        mask = labels != IGNORE_INDEX
        objective = self.phase.objective
        use_teacher = self.phase.has_teacher and objective.kd_weight > 0
        started = time.perf_counter()
        cached = self._cached_teacher(batch["example_index"], mask) if use_teacher and self.phase.cache else None
        self.teacher_seconds += time.perf_counter() - started
        if self.student_head is not None:
            return self._fused_loss(inputs, labels, mask, num_valid_tokens, use_teacher, cached)
        # Plain path: full logits, compared over the tokenizer's real vocabulary only.
        logits = self.engine(**inputs).logits[:, :-1, :self.vocab_size]
        loss, parts = logits.new_zeros((), dtype=torch.float32), {}
        if use_teacher:
            kd_logits = logits
            if cached is None:
                started = time.perf_counter()
                with torch.no_grad():
                    teacher_logits = self.phase.teacher(**inputs).logits[:, :-1, :self.vocab_size]
                self.teacher_seconds += time.perf_counter() - started
            elif self.phase.sparse == "tail":  # top-k + tail bucket: k + 1 outcomes on both sides
                kd_logits = student_topk_tail_logits(logits, cached.topk_ids, objective.temperature)
                teacher_logits = teacher_topk_tail_logits(cached.topk_logprobs, cached.tail_logmass)
            else:
                teacher_logits = dense_teacher_logits(cached.topk_ids, cached.topk_logprobs, self.vocab_size)
            kd_mask, kd_count = mask, num_valid_tokens
            if objective.token_selection is not None:  # distil only the selected share of tokens
                kd_mask = select_tokens(kd_logits, teacher_logits, mask, ratio=objective.token_selection,
                                        temperature=objective.temperature)
                kd_count = max(1, round(num_valid_tokens * objective.token_selection))
            kd = self.divergence(kd_logits, teacher_logits, kd_mask, temperature=objective.temperature,
                                 num_valid_tokens=kd_count, **self.loss_params)
            loss = loss + objective.kd_weight * kd
            parts["kd"] = kd.item()
        if objective.ce_weight > 0:
            ce = cross_entropy(logits, labels, mask, num_valid_tokens=num_valid_tokens)
            loss = loss + objective.ce_weight * ce
            parts["ce"] = ce.item()
        if objective.entropy_weight != 0:
            entropy = student_entropy(logits, mask, num_valid_tokens=num_valid_tokens)
            loss = loss + objective.entropy_weight * entropy
            parts["entropy"] = entropy.item()
        parts["loss"] = loss.item()
        return loss, parts

    def _cached_teacher(self, example_index: torch.Tensor, mask: torch.Tensor) -> TeacherSignal:
        """The batch's teacher from the cache: top-k ids, log-probs and tail at the loss positions."""
        spans = [self.phase.cache_spans[i] for i in example_index.tolist()]
        ids, logprobs, tail = (t.to(mask.device) for t in self.phase.cache.batch(spans, mask.cpu()))
        return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs,
                             tail_logmass=tail if self.phase.sparse == "tail" else None)

    def _fused_loss(self, inputs, labels, mask, num_valid_tokens, use_teacher,
                    cached: TeacherSignal | None) -> tuple[torch.Tensor, dict]:
        """Hidden states + head, chunked: full-vocabulary logits never exist for all tokens."""
        objective = self.phase.objective
        hidden = self.engine(**inputs)[:, :-1]
        teacher = cached
        if use_teacher and cached is None:
            started = time.perf_counter()
            with torch.no_grad():
                teacher_base, teacher_lm_head = self.teacher_head or (None, None)
                if teacher_base is not None:
                    teacher = TeacherSignal(hidden=teacher_base(**inputs).last_hidden_state[:, :-1],
                                            weight=teacher_lm_head.weight, bias=teacher_lm_head.bias)
                else:  # a teacher without a plain linear head: its logits, as they come
                    teacher = TeacherSignal(logits=self.phase.teacher(**inputs).logits[:, :-1])
            self.teacher_seconds += time.perf_counter() - started
        head = self.student_head[1]
        parts = {}
        # One chunked pass computes the divergence and CE together (each chunk's logits once).
        loss = fused_linear_distillation(
            hidden, head.weight, teacher, labels=labels, mask=mask, loss=objective.loss,
            kd_weight=objective.kd_weight if use_teacher else 0.0, ce_weight=objective.ce_weight,
            temperature=objective.temperature, student_bias=head.bias, vocab_size=self.vocab_size,
            num_valid_tokens=num_valid_tokens, memory_budget_bytes=int(self.spec.loss_memory_mb * 2**20),
            parts=parts, **(self.loss_params if use_teacher else {}))
        parts["loss"] = loss.item()
        return loss, parts

    def _clip(self) -> float:
        if self.spec.max_grad_norm is not None:
            return float(self.accelerator.clip_grad_norm_(self.engine.parameters(), self.spec.max_grad_norm))
        norms = [p.grad.norm() for p in self.engine.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    # ---- eval, logs, checkpoints (main process writes; the others wait) ---------------------

    def _run_eval(self, step: int) -> dict:
        record = {"phase": self.phase.name, "step": step}
        if self.accelerator.is_main_process:
            self.model.eval()
            record.update(self.evaluate(self.model))
            self.model.train()
            self._append(self.metrics_file, record)
        self.accelerator.wait_for_everyone()
        return record

    def _checkpoint(self, step: int, position: int) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.phase.checkpoint_dir, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler,
                            state={"step": step, "position": position, "phase": self.phase.name,
                                   "taid": self.taid.state_dict() if self.taid is not None else None})
        self.accelerator.wait_for_everyone()

    def _append(self, file: Path | None, record: dict) -> None:
        if file is not None and self.accelerator.is_main_process:
            with open(file, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _truncate_logs(self, step: int) -> list[dict]:
        """Drop this phase's log lines after `step` (written after the checkpoint we resume
        from); return its eval history up to `step`."""
        history = []
        for file in (self.metrics_file, self.losses_file):
            if file is None or not file.exists():
                continue
            kept = []
            for line in file.read_text().splitlines():
                record = json.loads(line)
                if record.get("phase") == self.phase.name and record["step"] > step:
                    continue
                kept.append(line)
                if file == self.metrics_file and record.get("phase") == self.phase.name:
                    history.append(record)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                file.write_text("".join(line + "\n" for line in kept))
        return history
