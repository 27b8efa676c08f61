"""The classifier / feature distillation loop: any `nn.Module` student, one or more frozen teachers (or
the student's own EMA / checkpoint, or an online peer), an objective that is a weighted sum of terms.

A step reads top to bottom: batch -> teacher logits and hooked features (no grad) -> student logits and
features -> each term -> weighted sum -> backward, step (-> EMA update). Learned projectors (when a
student feature's shape differs from the teacher's) train with the student and are never saved with it.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill.core.hooks import FeatureTaps, check_feature_name, forward
from distill.classifier.recipe import CE_TERM, ClassifierRegimeSpec, ClassifierTrainSpec, TermSpec
from distill.core.errors import DistillError
from distill.losses.classic import CLASSIC_REGISTRY
from distill.losses.ensemble import balanced_divergence, combine_teachers
from distill.losses.features import FEATURE_REGISTRY, NEEDS_EQUAL_SHAPES, class_means, nd_loss
from distill.losses.projectors import make_projector


def _bdkd(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0, gamma: float = 2.0):
    return balanced_divergence(student_logits, teacher_logits, temperature=temperature, gamma=gamma)


LOGIT_TERMS: dict[str, Callable] = {**CLASSIC_REGISTRY, "bdkd": _bdkd}


@dataclass
class Term:
    """One weighted objective term, resolved: its function, parameters and (feature terms) projector."""

    spec: TermSpec
    index: int
    projector: nn.Module | None = None
    teacher_class_means: torch.Tensor | None = None  # nd: teacher class-mean features of its layer
    teacher_norm: float | None = None  # nd: the teacher's mean feature norm there (the student's norm target)

    @property
    def name(self) -> str:
        return f"{self.spec.loss}" if self.index == 0 else f"{self.spec.loss}.{self.index}"

    @property
    def params(self) -> dict:
        return dict(self.spec.model_extra or {})

    @property
    def is_feature(self) -> bool:
        return self.spec.loss in FEATURE_REGISTRY or self.spec.loss == "nd"

    def weight_at(self, epoch: float) -> float:
        ramp = min(epoch / self.spec.warmup_epochs, 1.0) if self.spec.warmup_epochs > 0 else 1.0
        return self.spec.weight * ramp

    def value(self, student_logits, teacher_logits, labels, student_features, teacher_features) -> torch.Tensor:
        loss = self.spec.loss
        if loss == CE_TERM:
            return F.cross_entropy(student_logits, labels)
        if loss in LOGIT_TERMS:
            return LOGIT_TERMS[loss](student_logits, teacher_logits, labels, **self.params)
        student = student_features[self.spec.student_layer]
        if self.projector is not None:
            student = self.projector(student)
        if loss == "nd":
            return nd_loss(student.flatten(1), self.teacher_class_means, labels,
                           **{"teacher_norm": self.teacher_norm, **self.params})
        return FEATURE_REGISTRY[loss](student, teacher_features[self.spec.teacher_layer], **self.params)


def _is_training(model: nn.Module) -> bool:
    return any(module.training for module in model.modules())


@dataclass
class ClassifierTrainer:
    """Trains `student` (and an online `peer`) on (train_x, train_y) with the objective `terms`."""

    student: nn.Module
    terms_spec: list[TermSpec]
    train_x: torch.Tensor | dict
    train_y: torch.Tensor
    spec: ClassifierTrainSpec
    regime: ClassifierRegimeSpec
    phase: str = "distilled"
    teachers: list[nn.Module] = field(default_factory=list)
    peer: nn.Module | None = None
    evaluate: Callable[[nn.Module], dict] | None = None
    eval_every_epochs: float = 1.0
    metrics_file: Path | None = None
    losses_file: Path | None = None
    terms: list[Term] = field(init=False, default_factory=list)

    def __post_init__(self):
        for index, teacher in enumerate(self.teachers):
            if _is_training(teacher):
                warnings.warn(f"teacher {index} was in training mode (dropout / batch-norm statistics would change "
                              "its outputs); distill put it in eval mode", stacklevel=3)
            teacher.eval().requires_grad_(False)
        self.terms = [Term(spec, index) for index, spec in enumerate(self.terms_spec)]
        self.num_examples = len(self.train_y)
        self.steps_per_epoch = math.ceil(self.num_examples / self.spec.batch_size)
        self.total_steps = max(1, math.ceil(self.spec.epochs * self.steps_per_epoch))
        self.self_teacher = None
        if self.regime.kind == "self":  # the student's EMA or checkpoint; starts as a copy of the student
            self.self_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        if self.regime.kind == "online" and any(t.is_feature for t in self.terms):
            raise DistillError("regime online trains two models on each other's logits; feature terms need a "
                               "frozen teacher", field="objective.terms", fix="keep logit terms (ce, kd, bdkd, ...)")

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

    def prepare(self) -> None:
        """Check hook names, build projectors from one batch's shapes, and compute ND's class means."""
        teacher = (self._teacher_models() or [None])[0]
        for position, term in enumerate(self.terms):
            if not term.is_feature:
                continue
            check_feature_name(self.student, term.spec.student_layer, field=f"objective.terms.{position}.student_layer",
                               role="student")
            if teacher is not None and term.spec.teacher_layer:
                check_feature_name(teacher, term.spec.teacher_layer, field=f"objective.terms.{position}.teacher_layer",
                                   role="teacher")
        if not any(t.is_feature for t in self.terms):
            return
        probe = torch.arange(min(self.spec.batch_size, self.num_examples))
        inputs, labels = self._batch(probe)
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
            if term.spec.loss == "nd":
                term.teacher_class_means, term.teacher_norm = self._class_means(term)
                target_shape = (term.teacher_class_means.shape[1],)
                student_shape = (math.prod(student_shape),)
            else:
                target_shape = tuple(teacher_features[term.spec.teacher_layer].shape[1:])
            if term.spec.loss not in NEEDS_EQUAL_SHAPES and term.spec.loss != "nd":
                continue  # relational / attention losses compare shapes of their own kind
            if student_shape == target_shape:
                continue
            if term.spec.projector == "none":
                raise DistillError(f"student feature `{term.spec.student_layer}` has shape {student_shape} and teacher "
                                   f"feature `{term.spec.teacher_layer}` {target_shape}; `{term.spec.loss}` needs equal "
                                   "shapes", field=f"{where}.projector",
                                   fix="set projector: auto (a learned linear / 1x1-conv map), or pick layers of equal shape")
            try:
                term.projector = make_projector(student_shape, target_shape)
            except ValueError as error:
                raise DistillError(str(error), field=where, fix="pick other layers") from None

    @torch.no_grad()
    def _class_means(self, term: Term) -> tuple[torch.Tensor, float]:
        """ND: the teacher's class-mean features of `teacher_layer` over the training set, and their mean norm."""
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
        total, parts = 0.0, {}
        for term in self.terms:
            weight = term.weight_at(epoch)
            value = term.value(logits, teacher_logits, labels, features, teacher_features)
            parts[term.name] = float(value.detach())
            if weight:
                total = total + weight * value
        return total, parts

    def fit(self) -> nn.Module:
        """Train for `spec.epochs`; evaluate every `eval_every_epochs`; return the student."""
        self.prepare()
        models = [self.student] + ([self.peer] if self.peer is not None else [])
        parameters = [p for m in models + self.projectors() for p in m.parameters()]
        optimizer, scheduler = self._optimizer(parameters)
        generator = torch.Generator().manual_seed(self.spec.seed)
        eval_every = max(1, round(self.eval_every_epochs * self.steps_per_epoch))
        student_layers = self._layers("student")
        bar = tqdm(total=self.total_steps, desc=self.phase, dynamic_ncols=True, leave=False)
        step, order = 0, torch.empty(0, dtype=torch.long)
        for model in models + self.projectors():
            model.train()
        while step < self.total_steps:
            if step % self.steps_per_epoch == 0:
                order = torch.randperm(self.num_examples, generator=generator)
            position = (step % self.steps_per_epoch) * self.spec.batch_size
            inputs, labels = self._batch(order[position:position + self.spec.batch_size])
            epoch = step / self.steps_per_epoch
            started = time.perf_counter()
            teacher_logits, teacher_features = self.teacher_signal(inputs)
            teacher_seconds = time.perf_counter() - started
            taps = FeatureTaps(self.student, student_layers)
            with taps:
                logits = forward(self.student, inputs, taps)
            if self.peer is not None:  # online: each model learns from the other (detached)
                peer_logits = forward(self.peer, inputs)
                loss, parts = self._objective(logits, peer_logits.detach(), labels, {}, {}, epoch)
                peer_loss, _ = self._objective(peer_logits, logits.detach(), labels, {}, {}, epoch)
                loss = loss + peer_loss
            else:
                loss, parts = self._objective(logits, teacher_logits, labels, taps.features, teacher_features, epoch)
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
            if step % self.spec.log_every == 0 or step == self.total_steps:
                ce = sum(v for k, v in parts.items() if k.split(".")[0] == CE_TERM)
                self._log(self.losses_file, {"phase": self.phase, "step": step, "epoch": round(step / self.steps_per_epoch, 3),
                                             "loss": float(loss.detach()), "kd": float(loss.detach()) - ce, "ce": ce,
                                             **parts, "lr": scheduler.get_last_lr()[0],
                                             "step_seconds": time.perf_counter() - started,
                                             "teacher_seconds": teacher_seconds})
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if self.evaluate is not None and (step % eval_every == 0 or step == self.total_steps):
                self._log(self.metrics_file, {"phase": self.phase, "step": step, **self.evaluate(self.student)})
                for model in models + self.projectors():
                    model.train()
        bar.close()
        self.student.eval()
        return self.student

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

    @staticmethod
    def _log(file: Path | None, record: dict) -> None:
        if file is not None:
            with open(file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
