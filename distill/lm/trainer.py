"""The causal-LM training loop on `accelerate`; what a micro-batch holds and how it is scored is the
regime's (distill/lm/regimes.py), which sees the trainer only through a `StudentView`.

One optimizer step reads top to bottom: take the step's examples -> the regime makes each micro-batch
(the data's sequences, or the student's samples) -> count valid tokens over the whole accumulated batch
(all processes) -> per micro-batch: the regime's loss (student forward, teacher signal under no_grad,
objective) normalised by that count -> backward -> clip, step, schedule -> log, eval, checkpoint.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable

import torch
from tqdm.auto import tqdm

from distill.core.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, simulate_crash_after
from distill.core.errors import DistillError, InterruptedRun
from distill.core.rundir import RunDirectory
from distill.lm.data import IGNORE_INDEX, BatchOrder, Example
from distill.lm.models import is_peft, set_activation_checkpointing, transformers_model
from distill.lm.recipe import TrainSpec
from distill.lm.regimes import StepTiming, StudentView
from distill.lm.sharding import (FullStateDict, clip_grad_norm, final_hidden_states, gathered, gathered_all,
                                   is_sharded, shard_causal_lm, sharding_applies)
from distill.lm.teacher.live import fused_head


class FinalHiddenStates(torch.nn.Module):
    """A causal LM up to its final (normed) hidden states: what DDP wraps on the fused path.
    The head's weight is used by the loss outside forward and still gets its gradient."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask, use_cache: bool = False, position_ids=None):
        # (through the FSDP root's hooks when sharded: see distill/lm/sharding.py)
        return final_hidden_states(self.causal_lm, input_ids, attention_mask, position_ids)


class TrainableWeights:
    """The trainable parameters of a model (a LoRA student's adapters) as a checkpointable state: what a
    checkpoint must hold to resume, without the frozen base weights."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine):
            raise DistillError("the checkpoint's trainable weights are not this student's", field="--resume",
                               fix="resume with the recipe the run started with, or run again with --overwrite")
        with torch.no_grad():
            for name, tensor in state.items():
                mine[name].copy_(tensor)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_param_dtype(spec: TrainSpec) -> torch.dtype | None:
    """The dtype FSDP gathers the student's parameters in: bf16 runs gather (and compute) in bf16, with
    float32 shards and gradient reduction; fp16 is refused under FSDP by the recipe."""
    return torch.bfloat16 if spec.precision == "bf16" else None


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a mixed precision this device cannot run, before training starts."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return
    supported = True
    if device.type == "cuda" and dtype == torch.bfloat16:
        supported = torch.cuda.is_bf16_supported()
    else:
        try:
            with torch.autocast(device_type=device.type, dtype=dtype):
                supported = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == dtype
        except (RuntimeError, ValueError):
            supported = False
    if not supported:
        raise DistillError(f"train.precision {precision} is not supported on this {device.type} device",
                           field="train.precision", fix="use fp32 (or bf16 / fp16, whichever the device has)")


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
    """Trains `student` for `spec.steps` optimizer steps with `regime`; only the main process writes."""

    def __init__(self, *, accelerator, student, regime, phase: str, examples: list[Example], pad_token_id: int,
                 vocab_size: int, spec: TrainSpec, eval_every: int, evaluate: Callable[[torch.nn.Module], dict],
                 run_dir: RunDirectory, eval_reads: tuple = (), weights: list[float] | None = None):
        """`eval_reads`: other (possibly sharded) models that `evaluate` runs, e.g. the teacher. `weights`: each
        example's sampling weight (data.weights; None: every example once per epoch)."""
        self.accelerator, self.regime, self.phase, self.spec = accelerator, regime, phase, spec
        if weights is not None and len(weights) != len(examples):
            raise DistillError(f"data.weights has {len(weights)} row weights for {len(examples)} training examples of "
                               f"phase {phase}", field="data.weights", fix="weight rows of an off_policy, on_policy, "
                               "sequence or opd run (one example per row)")
        self.row_weights = weights
        self.eval_reads = eval_reads
        self.examples, self.eval_every, self.evaluate, self.run_dir = examples, eval_every, evaluate, run_dir
        # `model` is what was given (a peft model for a LoRA student: it saves the adapter), `causal_lm` the
        # transformers model inside (LoRA layers injected: it computes the adapted function).
        self.model, causal_lm = student, transformers_model(student)
        dtype, device_type = AUTOCAST_DTYPES.get(spec.precision), accelerator.device.type
        self.lora = any(not p.requires_grad for p in student.parameters())
        if spec.gradient_checkpointing:
            set_activation_checkpointing(causal_lm, True)
        # FSDP (train.sharding: fsdp, 2+ processes): every process holds 1/world of each parameter, its
        # gradient and optimizer state; the optimizer is built on the shards, after sharding.
        self.sharded = sharding_applies(spec.sharding, accelerator.num_processes)
        if self.sharded and not is_sharded(causal_lm):  # (a student from student.path may load sharded)
            shard_causal_lm(causal_lm, trainable=True, mixed_precision=fsdp_param_dtype(spec))
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = make_scheduler(optimizer, spec)  # stepped by us: once per optimizer step
        self.scaler = torch.amp.GradScaler(accelerator.device.type) if spec.precision == "fp16" else None
        # The fused path runs the model up to its final hidden states and applies the head chunk by chunk
        # in the loss; a regime or objective that needs a micro-batch's full logits takes the plain path.
        # `engine` is what accelerate wraps (DDP), or the sharded model itself.
        fusable = spec.fused_loss and not regime.full_logits and regime.objective.fusable
        head = fused_head(causal_lm) if fusable else None
        engine = FinalHiddenStates(causal_lm) if head else causal_lm
        self.engine, self.optimizer = (engine, optimizer) if self.sharded else accelerator.prepare(engine, optimizer)
        self.student = StudentView(
            model=causal_lm, engine=self.engine, head=head[1] if head else None, vocab_size=vocab_size,
            pad_token_id=pad_token_id, seed=spec.seed, grad_accum=spec.grad_accum,
            autocast=(lambda: torch.autocast(device_type=device_type, dtype=dtype)) if dtype else nullcontext,
            adapters_off=student.disable_adapter if is_peft(student) else None)
        # A checkpoint holds what trains: all weights, or a LoRA student's adapters only; sharded, the full
        # state gathered from every process (the same files as one process writes, optimizer keyed by name).
        self.weights = TrainableWeights(student) if self.lora else student
        self.optimizer_state = self.optimizer
        if self.sharded:
            self.weights, self.optimizer_state = FullStateDict(causal_lm), FullStateDict(causal_lm, self.optimizer)

    @property
    def checkpoint_dir(self):
        return self.run_dir.checkpoint_dir(self.phase)

    def fit(self, resume: bool = False) -> None:
        """Train to `spec.steps` (from the phase's checkpoint if `resume` finds one)."""
        spec, accelerator = self.spec, self.accelerator
        self.private = None
        if spec.privacy is not None:  # DP-SGD (core.privacy): Poisson batches, per-row gradients to opacus
            from distill.core.privacy import PrivateTraining

            if accelerator.num_processes > 1:
                raise DistillError("DP training runs in one process so far", field="train.privacy",
                                   fix="launch it without accelerate / torchrun, or remove train.privacy")

            self.private = PrivateTraining(spec.privacy, self.optimizer, num_examples=len(self.examples),
                                           batch_size=spec.batch_size, steps=spec.steps, seed=spec.seed)
        order = BatchOrder(len(self.examples), spec.seed, self.row_weights)
        step, position, last_checkpoint = 0, 0, None
        if resume and (found := find_checkpoint(self.checkpoint_dir)) is not None:
            state = load_checkpoint(found, modules={"model": self.weights}, optimizers={"optimizer": self.optimizer_state},
                                    schedulers={"scheduler": self.scheduler})
            step, position, last_checkpoint = state["step"], state["position"], state["step"]
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            self.regime.load_state_dict(state.get("regime", {}))
            if self.private is not None:
                self.private.load_state_dict(state.get("privacy", {}))
        self.run_dir.rewind(self.phase, step)
        accelerator.wait_for_everyone()
        self.engine.train()
        progress = tqdm(total=spec.steps, initial=step, desc=self.phase, disable=not accelerator.is_main_process,
                        dynamic_ncols=True, leave=False)
        while step < spec.steps:
            try:
                step, position, last_checkpoint = self._step(step, position, last_checkpoint, order, progress)
            except InterruptedRun as error:  # e.g. a served teacher stopped answering: say what is kept
                where = (f"its last checkpoint (step {last_checkpoint}) is in {self.checkpoint_dir}"
                         if last_checkpoint is not None else "no checkpoint was written yet")
                raise InterruptedRun(f"{self.phase}: training stopped at step {step + 1}: {error.message}; {where}",
                                     field=error.field, fix=error.fix) from None
        progress.close()
        self.privacy = self.private.summary() if self.private is not None else None
        if self.spec.gradient_checkpointing:
            set_activation_checkpointing(transformers_model(self.model), False)

    def _private_step(self, step: int) -> tuple[dict, int, int, float]:
        """DP-SGD: a Poisson batch; each row's loss (a mean over its own tokens) backpropagated alone; the per-row
        gradients clipped, summed and noised by opacus. Returns (loss totals, rows, tokens, teacher seconds)."""
        private = self.private
        indices = private.batch(step)
        params = list(private.optimizer.params)
        per_row, totals, tokens, teacher_seconds = [], {"loss": 0.0, "kd": 0.0, "ce": 0.0, "entropy": 0.0}, 0, 0.0
        if indices:
            made = self.regime.micro_batch([self.examples[i] for i in indices], indices, self.student, step=step,
                                           micro=0, rank=0)
            batch = made.tensors
            rows = len(batch["input_ids"])
            for row in range(rows):
                one = {}
                for key, value in batch.items():
                    if not (isinstance(value, torch.Tensor) and value.dim() and len(value) == rows):
                        raise DistillError(f"regime {self.regime.__class__.__name__} builds batch-wide tensors "
                                           f"(`{key}`): its rows are not separable for per-row privacy",
                                           field="train.privacy", fix="use regime off_policy, on_policy, sequence "
                                           "or opd without a batch baseline")
                    one[key] = value[row:row + 1].to(self.accelerator.device)
                valid = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
                result = self.regime.loss(one, self.student, max(valid, 1))
                teacher_seconds += result.teacher_seconds
                grads = torch.autograd.grad(result.loss, params, allow_unused=True)
                per_row.append({p: g for p, g in zip(params, grads) if g is not None})
                for key, value in result.parts.items():
                    totals[key] = totals.get(key, 0.0) + value / rows
                tokens += int(one["attention_mask"].sum())
        private.store(per_row)
        private.step(step)
        self.scheduler.step()
        return totals, len(per_row), tokens, teacher_seconds

    def _step(self, step: int, position: int, last_checkpoint: int | None, order, progress):
        """One optimizer step (and its log, eval, checkpoint); returns (step, position, last checkpoint)."""
        spec, accelerator = self.spec, self.accelerator
        if self.private is not None:
            started = time.perf_counter()
            totals, rows, tokens, teacher_seconds = self._private_step(step)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{totals['loss']:.4f}")
            seconds = time.perf_counter() - started
            return self._after_step(step, position, last_checkpoint, lambda: {
                **totals, "lr": self.scheduler.get_last_lr()[0], "epsilon": self.private.epsilon(),
                "clipped": self.private.last_clipped, "rows": rows, "tokens_per_second": tokens / max(seconds, 1e-9),
                "step_seconds": seconds, "teacher_seconds": teacher_seconds})
        world, rank = accelerator.num_processes, accelerator.process_index
        started = time.perf_counter()
        micro_batches, timing = [], StepTiming()
        # Sharded, sampling runs on gathered weights: processes draw different lengths, out of step.
        with gathered(self.student.model) if self.sharded and self.regime.samples else nullcontext():
            for micro in range(spec.grad_accum):
                indices = order.take(position, spec.batch_size * world)
                position += spec.batch_size * world
                mine = indices[rank * spec.batch_size:(rank + 1) * spec.batch_size]
                made = self.regime.micro_batch([self.examples[i] for i in mine], mine, self.student, step=step,
                                               micro=micro, rank=rank)
                timing.add(made)
                micro_batches.append(made.tensors)
        if step + 1 < spec.steps and not self.regime.samples:  # the next step's data is known: a served teacher
            ahead = position                                   # starts on it while the student trains on this one
            for _ in range(spec.grad_accum):
                indices = order.take(ahead, spec.batch_size * world)[rank * spec.batch_size:(rank + 1) * spec.batch_size]
                self.regime.ahead([self.examples[i] for i in indices], indices, self.student)
                ahead += spec.batch_size * world
        # The loss is a mean over every valid token of the accumulated batch on all processes.
        local_valid = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        num_valid_tokens = int(accelerator.reduce(torch.tensor(local_valid, device=accelerator.device), "sum"))
        totals, teacher_seconds = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "entropy": 0.0}, 0.0
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(self.engine):
                result = self.regime.loss(batch, self.student, max(num_valid_tokens, 1))
                # DDP averages gradients over processes; the loss is already a global mean.
                scaled = result.loss * world
                accelerator.backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)
            teacher_seconds += result.teacher_seconds
            for key, value in result.parts.items():  # (a regime may log parts of its own, e.g. `overlap`)
                totals[key] = totals.get(key, 0.0) + value
        totals = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "sum"))
                  for k, v in totals.items()}
        self.regime.objective.end_step(totals["kd"], progress=(step + 1) / spec.steps)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        # fp16: an overflow in the gradients makes the scaler skip the step and lower its scale
        overflow = self.scaler is not None and not math.isfinite(grad_norm)
        if not math.isfinite(totals["loss"]) or not (math.isfinite(grad_norm) or overflow):
            where = (f"the last good checkpoint is step {last_checkpoint} in {self.checkpoint_dir}"
                     if last_checkpoint is not None else "no checkpoint was written yet")
            raise DistillError(f"{self.phase}: the loss became non-finite at step {step + 1} "
                               f"(loss={totals['loss']}, grad norm={grad_norm}); training stopped and {where}",
                               field="train.lr", fix="lower train.lr or raise objective.temperature, then run "
                                                     "again (with --resume to continue from the checkpoint)")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches) * world
        step_seconds = time.perf_counter() - started
        tokens_per_second = tokens / max(step_seconds, 1e-9)
        progress.update(1)
        progress.set_postfix(loss=f"{totals['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}")
        return self._after_step(step, position, last_checkpoint, lambda: {
            **totals, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "fused_loss": self.student.head is not None, **(timing.record() if self.regime.samples else {}),
            "tokens_per_second": tokens_per_second, "step_seconds": step_seconds, "teacher_seconds": teacher_seconds})

    def _after_step(self, step: int, position: int, last_checkpoint: int | None, record: Callable[[], dict]):
        """After optimizer step `step`: its loss record (built only when one is due), eval and checkpoint as
        the spec says; returns (step, position, last checkpoint)."""
        spec = self.spec
        if step % spec.log_every == 0 or step == spec.steps:
            self.run_dir.log_losses({"phase": self.phase, "step": step, **record()})
        if step % self.eval_every == 0 or step == spec.steps:
            self._run_eval(step)
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            self._checkpoint(step, position)
            last_checkpoint = step
            simulate_crash_after(step)
        return step, position, last_checkpoint

    def _clip(self) -> float:
        """The total gradient norm (over every process's shards when sharded), clipped to max_grad_norm."""
        return clip_grad_norm(self.engine.parameters(), self.spec.max_grad_norm)

    # ---- eval and checkpoints (the main process writes; the others wait) -----------------------------

    def _run_eval(self, step: int) -> None:
        # Sharded: every process gathers the student (and the models the evaluation reads, e.g. the
        # teacher); the main process evaluates on the full weights.
        with self._gathered_for_eval():
            if self.accelerator.is_main_process:
                self.model.eval()
                self.run_dir.log_metrics({"phase": self.phase, "step": step, **self.evaluate(self.model)})
                self.model.train()
        self.accelerator.wait_for_everyone()

    def _gathered_for_eval(self):
        return gathered_all((self.student.model, *self.eval_reads)) if self.sharded else nullcontext()

    def _checkpoint(self, step: int, position: int) -> None:
        if self.sharded:  # collectives: every process gathers, the main one writes
            self.weights.gather()
            self.optimizer_state.gather()
        if self.accelerator.is_main_process:
            state = {"step": step, "position": position, "phase": self.phase, "regime": self.regime.state_dict()}
            if self.private is not None:
                state["privacy"] = self.private.state_dict()
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
            save_checkpoint(self.checkpoint_dir, modules={"model": self.weights},
                            optimizers={"optimizer": self.optimizer_state}, schedulers={"scheduler": self.scheduler},
                            state=state)
        self.accelerator.wait_for_everyone()
