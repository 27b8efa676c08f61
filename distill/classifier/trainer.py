"""The classifier / feature distillation loop: any `nn.Module` student, one or more frozen teachers (or
the student's own EMA / checkpoint, or an online peer), an objective that is a weighted sum of terms.

A step reads top to bottom: batch -> teacher logits and hooked features (no grad) -> student logits and
features -> each term -> weighted sum -> backward, step (-> EMA update). Learned projectors (when a
student feature's shape differs from the teacher's) train with the student and are never saved with it.

Every term is a registered loss (`distill.losses.registry`, kind `classifier` or `feature`); what a term
needs (labels, a teacher, the teacher's class means, equal shapes) is read from its spec, never from its
name. With a run directory the trainer logs to it and writes resumable checkpoints (student, peer,
projectors, self-teacher, optimizer, scheduler, the data-order generator): a run killed after a
checkpoint and resumed ends with the same weights, bit for bit.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.classifier.recipe import ClassifierRegimeSpec, ClassifierTrainSpec, TermSpec, term_loss
from distill.core.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, simulate_crash_after
from distill.core.errors import DistillError
from distill.core.hooks import FeatureTaps, check_feature_name, forward
from distill.core.rundir import RunDirectory
from distill.losses.ensemble import combine_teachers
from distill.losses.features import class_means
from distill.losses.projectors import make_projector
from distill.losses.registry import LossSpec


@dataclass
class Term:
    """One weighted objective term, resolved: its registered loss, parameters and (feature terms) projector."""

    spec: TermSpec
    loss: LossSpec
    index: int
    projector: nn.Module | None = None
    teacher_class_means: torch.Tensor | None = None  # needs_class_means: the teacher's class means of its layer
    teacher_norm: float | None = None  # ... and its mean feature norm there (the student's norm target)

    @property
    def name(self) -> str:
        return self.loss.name if self.index == 0 else f"{self.loss.name}.{self.index}"

    @property
    def params(self) -> dict:
        return dict(self.spec.model_extra or {})

    @property
    def is_feature(self) -> bool:
        return self.loss.kind == "feature"

    def weight_at(self, epoch: float) -> float:
        ramp = min(epoch / self.spec.warmup_epochs, 1.0) if self.spec.warmup_epochs > 0 else 1.0
        return self.spec.weight * ramp

    def value(self, student_logits, teacher_logits, labels, student_features, teacher_features) -> torch.Tensor:
        if not self.is_feature:
            return self.loss.fn(student_logits, teacher_logits, labels, **self.params)
        student = student_features[self.spec.student_layer]
        if self.projector is not None:
            student = self.projector(student)
        if self.loss.needs_class_means:
            return self.loss.fn(student.flatten(1), self.teacher_class_means, labels,
                                **{"teacher_norm": self.teacher_norm, **self.params})
        return self.loss.fn(student, teacher_features[self.spec.teacher_layer], **self.params)


def _is_training(model: nn.Module) -> bool:
    return any(module.training for module in model.modules())


class ClassifierTrainer:
    """Trains `student` (and an online `peer`) on (train_x, train_y) with the objective `terms`.

    Construction checks everything that can fail (hook names, feature shapes; projectors built, class
    means computed) before anything is written; `fit` trains."""

    def __init__(self, student: nn.Module, terms: list[TermSpec], train_x, train_y: torch.Tensor,
                 spec: ClassifierTrainSpec, regime: ClassifierRegimeSpec, *, phase: str = "distilled",
                 teachers: list[nn.Module] = (), peer: nn.Module | None = None,
                 evaluate: Callable[[nn.Module], dict] | None = None, eval_every_epochs: float = 1.0,
                 run_dir: RunDirectory | None = None):
        self.student, self.train_x, self.train_y, self.spec, self.regime = student, train_x, train_y, spec, regime
        self.phase, self.teachers, self.peer = phase, list(teachers), peer
        self.evaluate, self.eval_every_epochs, self.run_dir = evaluate, eval_every_epochs, run_dir
        for index, teacher in enumerate(self.teachers):
            if _is_training(teacher):
                warnings.warn(f"teacher {index} was in training mode (dropout / batch-norm statistics would change "
                              "its outputs); distill put it in eval mode", stacklevel=3)
            teacher.eval().requires_grad_(False)
        self.terms = [Term(term, term_loss(term.loss), index) for index, term in enumerate(terms)]
        self.num_examples = len(self.train_y)
        self.steps_per_epoch = math.ceil(self.num_examples / self.spec.batch_size)
        self.total_steps = max(1, math.ceil(self.spec.epochs * self.steps_per_epoch))
        self.self_teacher = None
        if self.regime.kind == "self":  # the student's EMA or checkpoint; starts as a copy of the student
            self.self_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        if self.regime.kind == "online" and any(t.is_feature for t in self.terms):
            raise DistillError("regime online trains two models on each other's logits; feature terms need a "
                               "frozen teacher", field="objective.terms", fix="keep logit terms (ce, kd, bdkd, ...)")
        if not self._teacher_models() and self.peer is None and any(t.loss.needs_teacher for t in self.terms):
            needs = next(t.name for t in self.terms if t.loss.needs_teacher)
            raise DistillError(f"objective term `{needs}` needs a teacher and there is none", field="objective.terms",
                               fix="give a teacher, or use only `ce`")
        self._prepare()

    # ---- teacher signal ------------------------------------------------------------------------

    def _teacher_models(self) -> list[nn.Module]:
        if self.regime.kind == "self":
            return [self.self_teacher]
        return self.teachers

    def _layers(self, role: str) -> list[str]:
        attribute = "student_layer" if role == "student" else "teacher_layer"
        return [getattr(t.spec, attribute) for t in self.terms if t.is_feature and getattr(t.spec, attribute)]

    @torch.no_grad()
    def teacher_signal(self, inputs) -> tuple[torch.Tensor | None, dict]:
        """Combined teacher logits and the first teacher's hooked features, for a batch."""
        models = self._teacher_models()
        if not models:
            return None, {}
        logits, features = [], {}
        for index, model in enumerate(models):
            taps = FeatureTaps(model, self._layers("teacher") if index == 0 else [])
            with taps:
                logits.append(forward(model, inputs, taps).float())
            if index == 0:
                features = taps.features
        if len(logits) == 1:
            return logits[0], features
        return combine_teachers(logits, mode=self.regime.combine), features

    # ---- set-up: names, shapes, projectors, class means -------------------------------------------

    def _batch(self, index: torch.Tensor):
        if isinstance(self.train_x, dict):
            return {key: value[index] for key, value in self.train_x.items()}, self.train_y[index]
        return self.train_x[index], self.train_y[index]

    def _prepare(self) -> None:
        """Check hook names, build projectors from one batch's shapes, and compute class means."""
        teacher = (self._teacher_models() or [None])[0]
        for position, term in enumerate(self.terms):
            if not term.is_feature:
                continue
            where = f"objective.terms.{position}"
            check_feature_name(self.student, term.spec.student_layer, field=f"{where}.student_layer", role="student")
            if teacher is None:
                raise DistillError(f"feature term `{term.name}` compares with a teacher's features and there is no "
                                   "teacher", field=f"{where}.loss", fix="give a teacher, or use logit terms")
            check_feature_name(teacher, term.spec.teacher_layer, field=f"{where}.teacher_layer", role="teacher")
            if self.spec.batch_size < term.loss.min_examples:
                raise DistillError(f"`{term.loss.name}` compares examples of a batch with each other and needs at "
                                   f"least {term.loss.min_examples} per batch", field="train.batch_size",
                                   fix=f"set train.batch_size >= {term.loss.min_examples}")
        if not any(t.is_feature for t in self.terms):
            return
        probe = torch.arange(min(self.spec.batch_size, self.num_examples))
        inputs, _ = self._batch(probe)
        _, teacher_features = self.teacher_signal(inputs)
        taps = FeatureTaps(self.student, self._layers("student"))
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad(), taps:
            forward(self.student, inputs, taps)
        self.student.train(was_training)
        for position, term in enumerate(self.terms):
            if not term.is_feature:
                continue
            where = f"objective.terms.{position}"
            student_shape = tuple(taps.features[term.spec.student_layer].shape[1:])
            if term.loss.needs_class_means:  # compared with class means of the teacher's (flattened) features
                term.teacher_class_means, term.teacher_norm = self._class_means(term)
                target_shape = (term.teacher_class_means.shape[1],)
                student_shape = (math.prod(student_shape),)
            else:
                target_shape = tuple(teacher_features[term.spec.teacher_layer].shape[1:])
            if not term.loss.equal_shapes or student_shape == target_shape:
                continue  # relational / attention terms compare shapes of their own kind
            if term.spec.projector == "none":
                raise DistillError(f"student feature `{term.spec.student_layer}` has shape {student_shape} and teacher "
                                   f"feature `{term.spec.teacher_layer}` {target_shape}; `{term.loss.name}` needs equal "
                                   "shapes", field=f"{where}.projector",
                                   fix="set projector: auto (a learned linear / 1x1-conv map), or pick layers of equal shape")
            try:
                term.projector = make_projector(student_shape, target_shape)
            except ValueError as error:
                raise DistillError(str(error), field=where, fix="pick other layers") from None

    @torch.no_grad()
    def _class_means(self, term: Term) -> tuple[torch.Tensor, float]:
        """The teacher's class-mean features of `teacher_layer` over the training set, and their mean norm."""
        teacher = self._teacher_models()[0]
        layer = term.spec.teacher_layer
        chunks = []
        for start in range(0, self.num_examples, 512):
            inputs, _ = self._batch(torch.arange(start, min(start + 512, self.num_examples)))
            taps = FeatureTaps(teacher, [layer])
            with taps:
                forward(teacher, inputs, taps)
            chunks.append(taps.features[layer].flatten(1).float())
        features = torch.cat(chunks)
        num_classes = int(self.train_y.max()) + 1
        return class_means(features, self.train_y, num_classes), float(features.norm(dim=1).mean())

    def projectors(self) -> list[nn.Module]:
        return [t.projector for t in self.terms if t.projector is not None]

    # ---- the loop ------------------------------------------------------------------------------

    def _optimizer(self, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        if self.spec.optimizer == "adam":
            optimizer = torch.optim.Adam(parameters, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        else:
            optimizer = torch.optim.SGD(parameters, lr=self.spec.lr, momentum=0.9, weight_decay=self.spec.weight_decay)
        if self.spec.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return optimizer, scheduler

    def _objective(self, logits, teacher_logits, labels, features, teacher_features, epoch: float):
        # Starts as a zero tied to the graph: while every weight is still 0 (warm-up) the step is a no-op.
        total, parts = logits.sum() * 0.0, {}
        for term in self.terms:
            weight = term.weight_at(epoch)
            value = term.value(logits, teacher_logits, labels, features, teacher_features)
            parts[term.name] = float(value.detach())
            if weight:
                total = total + weight * value
        return total, parts

    def _modules(self) -> dict[str, nn.Module]:
        """Everything that trains or changes during training, by checkpoint name."""
        modules = {"model": self.student}
        if self.peer is not None:
            modules["peer"] = self.peer
        if self.self_teacher is not None:
            modules["self_teacher"] = self.self_teacher
        modules.update({f"projector_{t.index}": t.projector for t in self.terms if t.projector is not None})
        return modules

    def fit(self, resume: bool = False) -> nn.Module:
        """Train for `spec.epochs` (from the phase's last checkpoint if `resume` finds one); evaluate every
        `eval_every_epochs`; return the student."""
        models = [self.student] + ([self.peer] if self.peer is not None else [])
        parameters = [p for m in models + self.projectors() for p in m.parameters()]
        optimizer, scheduler = self._optimizer(parameters)
        # The data order of an epoch is drawn from `generator`; `epoch_start` is its state before that draw,
        # what a checkpoint stores so that a resumed run draws the same order again.
        generator = torch.Generator().manual_seed(self.spec.seed)
        torch.manual_seed(self.spec.seed)  # dropout & co: a phase's randomness does not depend on what ran before
        step, order, epoch_start = 0, None, generator.get_state()
        checkpoints = self.run_dir.checkpoint_dir(self.phase) if self.run_dir is not None else None
        private = self._private(optimizer)
        if resume and checkpoints is not None and (found := find_checkpoint(checkpoints)) is not None:
            state = load_checkpoint(found, modules=self._modules(), optimizers={"optimizer": optimizer},
                                    schedulers={"scheduler": scheduler}, generators={"order": generator})
            step = state["step"]
            if private is not None:
                private.load_state_dict(state.get("privacy", {}))
        if self.run_dir is not None:
            self.run_dir.rewind(self.phase, step)
        eval_every = max(1, round(self.eval_every_epochs * self.steps_per_epoch))
        checkpoint_every = self.spec.checkpoint_every
        student_layers = self._layers("student")
        bar = tqdm(total=self.total_steps, initial=step, desc=self.phase, dynamic_ncols=True, leave=False)
        for model in models + self.projectors():
            model.train()
        while step < self.total_steps:
            if step % self.steps_per_epoch == 0 or order is None:
                epoch_start = generator.get_state()
                order = torch.randperm(self.num_examples, generator=generator)
            position = (step % self.steps_per_epoch) * self.spec.batch_size
            batch = (order[position:position + self.spec.batch_size] if private is None
                     else torch.tensor(private.batch(step), dtype=torch.long))  # DP: a Poisson batch
            inputs, labels = self._batch(batch)
            epoch = step / self.steps_per_epoch
            started = time.perf_counter()
            teacher_logits, teacher_features = self.teacher_signal(inputs) if len(labels) else (None, {})
            teacher_seconds = time.perf_counter() - started
            if private is not None:  # DP-SGD: each row's own gradient, clipped and noised by opacus
                loss, parts = self._private_step(private, step, inputs, labels, teacher_logits, teacher_features,
                                                 student_layers, epoch)
                scheduler.step()
                step += 1
                bar.update(1)
            else:
                taps = FeatureTaps(self.student, student_layers)
                with taps:
                    logits = forward(self.student, inputs, taps)
                if self.peer is not None:  # online: each model learns from the other (detached)
                    peer_logits = forward(self.peer, inputs)
                    loss, parts = self._objective(logits, peer_logits.detach(), labels, {}, {}, epoch)
                    peer_loss, _ = self._objective(peer_logits, logits.detach(), labels, {}, {}, epoch)
                    loss = loss + peer_loss
                else:
                    loss, parts = self._objective(logits, teacher_logits, labels, taps.features, teacher_features,
                                                  epoch)
            if private is None:
                if not torch.isfinite(loss):
                    raise DistillError(f"the loss became {float(loss)} at step {step} ({parts})", field="train.lr",
                                       fix="lower train.lr or a term's weight / temperature")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                self._update_self_teacher(step)
                step += 1
                bar.update(1)
            if self.run_dir is None:
                continue
            if step % self.spec.log_every == 0 or step == self.total_steps:
                hard = sum(parts[t.name] for t in self.terms if not t.loss.needs_teacher)
                self.run_dir.log_losses({"phase": self.phase, "step": step,
                                         "epoch": round(step / self.steps_per_epoch, 3),
                                         "loss": float(loss.detach()), "kd": float(loss.detach()) - hard, "ce": hard,
                                         **parts, "lr": scheduler.get_last_lr()[0],
                                         "step_seconds": time.perf_counter() - started,
                                         "teacher_seconds": teacher_seconds,
                                         **({"epsilon": private.epsilon(), "clipped": private.last_clipped,
                                             "rows": len(labels)} if private is not None else {})})
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if self.evaluate is not None and (step % eval_every == 0 or step == self.total_steps):
                self.run_dir.log_metrics({"phase": self.phase, "step": step, **self.evaluate(self.student)})
                for model in models + self.projectors():
                    model.train()
            if step % checkpoint_every == 0 or step == self.total_steps:
                # The next step's epoch order is drawn from `epoch_start`, or (a new epoch) from the generator now.
                draw_from = torch.Generator()
                draw_from.set_state(generator.get_state() if step % self.steps_per_epoch == 0 else epoch_start)
                save_checkpoint(checkpoints, modules=self._modules(), optimizers={"optimizer": optimizer},
                                schedulers={"scheduler": scheduler}, generators={"order": draw_from},
                                state={"step": step, "phase": self.phase,
                                       **({"privacy": private.state_dict()} if private is not None else {})})
                simulate_crash_after(step)
        bar.close()
        self.student.eval()
        self.privacy = private.summary() if private is not None else None
        return self.student

    # ---- differential privacy (train.privacy) ------------------------------------------------------

    def _private(self, optimizer):
        """The phase's DP-SGD state (core.privacy), or None without train.privacy."""
        if self.spec.privacy is None:
            return None
        from opacus.validators import ModuleValidator

        from distill.core.privacy import PrivateTraining

        problems = ModuleValidator.validate(self.student, strict=False)
        if problems:
            raise DistillError(f"the student cannot be trained privately: {problems[0]}", field="train.privacy",
                               fix="replace BatchNorm by GroupNorm or LayerNorm (opacus' ModuleValidator.fix)")
        return PrivateTraining(self.spec.privacy, optimizer, num_examples=self.num_examples,
                               batch_size=self.spec.batch_size, steps=self.total_steps, seed=self.spec.seed)

    def _private_step(self, private, step: int, inputs, labels, teacher_logits, teacher_features,
                      student_layers, epoch: float):
        """Backpropagate each row of the batch alone, hand the per-row gradients to opacus, step. Returns the
        batch's mean loss and parts (for the log)."""
        params = list(private.optimizer.params)
        per_row, total, parts_sum = [], 0.0, {}
        for row in range(len(labels)):
            one = slice(row, row + 1)
            row_inputs = {k: v[one] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[one]
            taps = FeatureTaps(self.student, student_layers)
            with taps:
                logits = forward(self.student, row_inputs, taps)
            loss, parts = self._objective(logits, None if teacher_logits is None else teacher_logits[one],
                                          labels[one], taps.features,
                                          {k: v[one] for k, v in teacher_features.items()}, epoch)
            if not torch.isfinite(loss):
                raise DistillError(f"the loss became {float(loss)} at step {step} ({parts})", field="train.lr",
                                   fix="lower train.lr or a term's weight / temperature")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            per_row.append({p: g for p, g in zip(params, grads) if g is not None})
            total += float(loss.detach())
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
        private.store(per_row)
        private.step(step)
        count = max(1, len(labels))
        return torch.tensor(total / count), {k: v / count for k, v in parts_sum.items()}

    @torch.no_grad()
    def _update_self_teacher(self, step: int) -> None:
        if self.self_teacher is None:
            return
        if self.regime.self_teacher == "ema":
            decay = self.regime.ema_decay
            for teacher_value, student_value in zip(self.self_teacher.state_dict().values(),
                                                    self.student.state_dict().values()):
                if teacher_value.dtype.is_floating_point:
                    teacher_value.mul_(decay).add_(student_value.detach(), alpha=1 - decay)
                else:  # counters (batch-norm's num_batches_tracked)
                    teacher_value.copy_(student_value)
        elif (step + 1) % (self.regime.refresh_epochs * self.steps_per_epoch) == 0:
            self.self_teacher.load_state_dict(self.student.state_dict())
