"""A recipe is one YAML file that says everything about a run (DESIGN.md, "Recipes").

`load_recipe(path, overrides)` reads YAML, applies `--set a.b=c` overrides and validates with
pydantic; every problem becomes a `DistillError` naming the field path and a fix, before any
model loads.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.core.errors import DistillError

BUILTIN_TASKS = ("oracle", "arithmetic")


class _FieldValueError(ValueError):
    """A model validator's complaint about one field below the model (`field`, dotted), so the
    error names e.g. `objective.beta` rather than just `objective`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunRecipe(_Strict):
    """What every task's recipe has: a name and a run directory."""

    name: str = "run"
    output: str | None = Field(None, description="Run directory; default runs/<name>.")

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class TeacherSpec(_Strict):
    """The model whose distribution the student learns."""

    path: str = Field(description="Local directory, hub id, or `builtin:<task>-teacher`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The teacher's own dtype; losses always compute in float32.")


class StudentSpec(_Strict):
    """The model being trained: a saved model (`path`) or the teacher's config with overrides."""

    path: str | None = Field(None, description="Local directory or hub id of a causal LM.")
    config: dict[str, Any] | None = Field(
        None, description="Overrides of the teacher's config, e.g. {hidden_size: 64, num_hidden_layers: 2}.")
    init_from_teacher_layers: list[int] | None = Field(
        None, description="Copy these teacher layers (and embeddings/head) into the student; "
                          "needs the same hidden size. Default: random init.")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `student.path` (a saved model) or `student.config` "
                             "(overrides of the teacher's config, `{}` for a copy of its shape)")
        if self.init_from_teacher_layers is not None and self.config is None:
            raise _FieldValueError("init_from_teacher_layers",
                                   "`init_from_teacher_layers` needs `student.config` (a student built from "
                                   "the teacher's config)")
        return self


class DataSpec(_Strict):
    """Training and evaluation data: a built-in task or local jsonl/parquet files."""

    builtin: Literal["oracle", "arithmetic"] | None = Field(None, description="A built-in task.")
    train: str | None = Field(None, description="jsonl/parquet with prompt+completion, text, or messages.")
    eval: str | None = Field(None, description="Eval file; default: the last `eval_size` train rows.")
    train_size: int = Field(2000, gt=0, description="Examples generated for a built-in task.")
    eval_size: int = Field(200, gt=0, description="Eval examples (built-in) or held-out rows (files).")
    seed: int = Field(0, description="Seed of the built-in task's sampled data.")
    max_length: int = Field(256, gt=1, description="Tokens per example, prompt included.")
    too_long: Literal["truncate", "refuse"] = Field(
        "truncate", description="Examples over max_length: cut with a warning, or refuse the run.")
    completion_only: bool = Field(True, description="Loss on completion tokens only (prompt masked).")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.builtin is None) == (self.train is None):
            raise ValueError("give exactly one of `data.builtin` (oracle | arithmetic) or `data.train` (a file)")
        if self.eval is not None and self.train is None:
            raise _FieldValueError("eval", "`data.eval` needs `data.train`; built-in tasks make their own eval set")
        return self


class TaidSpec(_Strict):
    """TAID's interpolation schedule (Shing et al. 2025): t rises from t_start to t_end, faster
    while the loss keeps falling (momentum of the relative loss change)."""

    t_start: float = Field(0.4, ge=0, lt=1)
    t_end: float = Field(1.0, gt=0, le=1)
    alpha: float = Field(5e-4, ge=0, le=1, description="Step size of the adaptive update.")
    beta: float = Field(0.99, ge=0, le=1, description="Momentum of the relative loss change.")
    adaptive: bool = Field(True, description="False: t follows the linear ramp only.")


class ObjectiveSpec(BaseModel):
    """The distillation loss; extra keys are the loss's own parameters (e.g. `beta` for jsd)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    loss: str = Field("forward_kl", description="A name from `distill losses`.")
    temperature: float = Field(1.0, gt=0, description="Divides both logits (no T^2 factor, as GKD/TRL).")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the divergence term.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of hard-label cross-entropy mixed in.")
    entropy_weight: float = Field(0.0, description="Adds entropy_weight * H(student): > 0 sharpens the student "
                                                   "(as TSD-KD), < 0 is a confidence penalty (Pereyra et al. 2017).")
    token_selection: float | None = Field(None, gt=0, le=1, description="Distil only this fraction of tokens, "
                                          "those where the student is least sure relative to the teacher (TSD-KD).")
    taid: "TaidSpec | None" = Field(None, description="TAID's adaptive schedule of t (loss `taid` only); "
                                                      "default {} when the loss is taid.")

    @model_validator(mode="after")
    def _known_loss_and_params(self) -> "ObjectiveSpec":
        from distill.losses import REGISTRY, get_loss, loss_parameters

        try:
            get_loss(self.loss)
        except (KeyError, ValueError):
            close = difflib.get_close_matches(self.loss, list(REGISTRY), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise _FieldValueError("loss", f"unknown loss `{self.loss}`; {hint}known: {', '.join(REGISTRY)}") from None
        allowed = loss_parameters(self.loss)
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                known = ", ".join(allowed) or "none"
                raise _FieldValueError(
                    key, f"`{key}` is not a parameter of loss `{self.loss}` (its parameters: {known})")
            if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
                try:
                    value = self.model_extra[key] = float(value)
                except ValueError:
                    pass
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _FieldValueError(key, f"`{key}` must be a number, got {value!r}")
        if self.taid is not None and get_loss(self.loss).__name__ != "taid":
            raise _FieldValueError("taid", "`objective.taid` (the schedule) needs `loss: taid`")
        if get_loss(self.loss).__name__ == "taid":
            # A fixed `t` is a constant interpolation; without it, TAID's adaptive schedule sets t.
            if "t" in (self.model_extra or {}) and self.taid is not None:
                raise _FieldValueError("t", "give either a fixed `t` or the schedule `objective.taid`, not both")
            if "t" not in (self.model_extra or {}) and self.taid is None:
                self.__dict__["taid"] = TaidSpec()  # (not assignment: that would re-run this validator)
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train on")
        return self

    def loss_params(self) -> dict[str, float]:
        """The loss-specific parameters with their defaults filled in."""
        from distill.losses import loss_parameters

        return {**loss_parameters(self.loss), **(self.model_extra or {})}


class RegimeSpec(_Strict):
    """Where the training sequences and the teacher signal come from."""

    kind: Literal["off_policy", "on_policy", "opd", "sequence", "self", "cache"] = Field(
        "off_policy", description="off_policy: dataset sequences scored by a live teacher; on_policy (GKD): with "
                                  "probability lmbda a batch's completions are sampled from the current student; "
                                  "opd: student samples, per-token teacher reward, policy gradient; "
                                  "sequence: the teacher completes the prompts once, the student learns its text; "
                                  "self (OPSD): the teacher is the student given privileged context; "
                                  "cache: the teacher's stored top-k (`distill cache`), no teacher in memory.")
    lmbda: float = Field(0.5, ge=0, le=1, description="on_policy / self: probability that a micro-batch's "
                                                      "completions are the student's own samples (GKD's lambda; "
                                                      "default 1 for self).")
    max_new_tokens: int | None = Field(None, gt=0, description="on_policy / sequence: tokens sampled per "
                                                               "completion (default: the longest in the data).")
    sample_temperature: float = Field(1.0, ge=0, description="on_policy / sequence: sampling temperature "
                                                             "(0: greedy, the usual choice for sequence KD).")
    top_p: float = Field(1.0, gt=0, le=1, description="on_policy / sequence: nucleus sampling mass.")
    rsd_threshold: float = Field(0.0, ge=0, le=1, description="sequence: student-aware filtering (reverse "
                                 "speculative decoding): the teacher proposes each token, and one whose probability "
                                 "under the initial student is below this is replaced by a student sample. 0: off.")
    scale: float = Field(1.0, gt=0, description="opd: reward scale on the teacher-vs-reference log-ratio; 1 is "
                                                "on-policy reverse KL, > 1 reward extrapolation (ExOPD).")
    reward: str | None = Field(None, description="opd: a verifiable sequence reward: `builtin` (the task's own, "
                                                 "e.g. arithmetic correctness) or `module:function` taking "
                                                 "(prompts, completions) lists of strings, returning floats.")
    reward_weight: float = Field(1.0, ge=0, description="opd: weight of the sequence reward's advantage.")
    privileged_field: str = Field("completion", description="self: the data field the teacher (the student "
                                                             "itself) sees before the prompt, e.g. the reference "
                                                             "solution.")
    privileged_template: str = Field("{privileged} {prompt}", description="self: the teacher's prompt text.")
    teacher_weights: Literal["snapshot", "current"] = Field(
        "snapshot", description="self: the teacher is a frozen copy of the initial student, or the current "
                                "weights under stop-grad.")
    group_size: int = Field(1, gt=0, description="opd: samples per prompt; > 1 centres sequence rewards on "
                                                 "their group mean. train.batch_size counts samples.")
    path: str | None = Field(None, description="cache: the directory `distill cache` writes and training reads.")
    k: int = Field(64, gt=0, description="cache: top-k entries per token to store (training may use fewer).")
    ids: Literal["rice", "packed"] = Field("rice", description="cache: token-id coding; rice (sorted ids, "
                                           "Golomb-Rice gaps) or packed (ceil(log2 V) bits each).")
    values: Literal["int8", "float16"] = Field("int8", description="cache: log-prob storage; int8 quantised per "
                                               "token or float16.")
    shard_examples: int = Field(256, gt=0, description="cache: examples per shard file (the unit of resume).")
    sparse: Literal["tail", "renormalize"] = Field(
        "tail", description="cache: compare over top-k + one tail bucket (proper distributions), or renormalise "
                            "the teacher's top-k to 1.")

    @model_validator(mode="after")
    def _available(self) -> "RegimeSpec":
        if self.kind == "self" and "lmbda" not in self.model_fields_set:
            self.__dict__["lmbda"] = 1.0  # on-policy self-distillation samples every batch by default
        if self.rsd_threshold > 0 and self.kind != "sequence":
            raise _FieldValueError("rsd_threshold", f"rsd_threshold filters teacher generations, which only regime "
                                                    f"`sequence` makes (this is `{self.kind}`); remove it or set "
                                                    "kind: sequence")
        if self.kind == "cache" and not self.path:
            raise _FieldValueError("path", "regime `cache` needs `path`, the cache directory")
        return self


class TrainSpec(_Strict):
    """Optimisation. `batch_size` is per process and micro-step (as in HF `per_device_*`)."""

    steps: int = Field(400, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients; null to disable.")
    seed: int = Field(0, description="Student init and data order.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between resumable checkpoints.")
    log_every: int = Field(10, gt=0, description="Steps between loss records.")
    baseline: bool = Field(True, description="Also train the student alone on hard labels (the 'alone' row).")
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads; default: torch's choice.")
    fused_loss: bool = Field(True, description="Chunked fused-linear loss: full-vocabulary logits never exist "
                                               "for all tokens at once (falls back to plain logits where a "
                                               "model or loss does not allow it).")
    loss_memory_mb: float = Field(512, gt=0, description="Memory budget (MiB) of one chunk of the fused loss.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise _FieldValueError("warmup_steps",
                                   f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class EvalSpec(_Strict):
    """Evaluation during and after training."""

    every: int = Field(100, gt=0, description="Steps between evals (metrics.jsonl).")
    batch_size: int = Field(32, gt=0)
    generate_size: int = Field(64, ge=0, description="Eval examples scored by generation.")
    throughput_tokens: int = Field(64, gt=0, description="New tokens per sequence when timing generation.")


class Recipe(RunRecipe):
    """Everything about one run. Every field has a default where one is sensible."""

    task: Literal["lm", "classifier", "diffusion"] = "lm"
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    regime: RegimeSpec = Field(default_factory=RegimeSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _task_available(self) -> "Recipe":
        if self.regime.kind == "opd" and self.train.batch_size % self.regime.group_size:
            raise ValueError(f"regime.group_size={self.regime.group_size} must divide train.batch_size="
                             f"{self.train.batch_size} (the batch counts samples: batch_size / group_size prompts)")
        return self


# ---- loading, overrides, readable errors ------------------------------------------------------

def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the nested dict `data` in place."""
    if "=" not in assignment:
        raise DistillError(f"`{assignment}` is not of the form key.path=value", field="--set",
                           fix="write e.g. --set train.steps=50")
    key_path, raw_value = assignment.split("=", 1)
    keys = [k for k in key_path.strip().split(".") if k]
    if not keys:
        raise DistillError(f"`{assignment}` names no field", field="--set", fix="write e.g. --set train.steps=50")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise DistillError(f"`{'.'.join(keys[:depth + 1])}` is a value, not a section", field="--set",
                               fix=f"set `{'.'.join(keys[:depth + 1])}=...` directly")
        node = child
    node[keys[-1]] = value


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (for 'did you mean' on unknown keys)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if annotation is None:
            return []
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _readable(error: ValidationError, model: type[BaseModel] | None = None) -> DistillError:
    lines, first_field = [], None
    for item in error.errors():
        loc = tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldValueError):
            loc += tuple(cause.field.split("."))
        field = ".".join(str(p) for p in loc) or "recipe"
        first_field = first_field or field
        kind, message = item["type"], item["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = _fields_at(model or Recipe, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key" + (f"; did you mean `{close[0]}`?" if close else "")
            message += f" (allowed here: {', '.join(allowed)})" if allowed else ""
        elif kind == "missing":
            message = "required field is missing"
        elif "input" in item and kind not in ("value_error", "assertion_error"):
            message += f" (got {item['input']!r})"
        lines.append(f"{field}: {message}")
    fix = "edit the recipe or override with --set FIELD=VALUE; `distill run --help` lists the options"
    return DistillError("invalid recipe\n  " + "\n  ".join(lines), field=None, fix=fix)


def parse_recipe(data: Any, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe given as a dict (after applying `overrides`)."""
    if not isinstance(data, dict):
        raise DistillError(f"a recipe is a mapping of sections, got {type(data).__name__}",
                           fix="start from recipes/oracle-demo.yaml")
    data = copy.deepcopy(data)  # overrides must not change the caller's dict
    for assignment in overrides:
        apply_override(data, assignment)
    model = Recipe
    if data.get("task") == "classifier":
        from distill.classifier.recipe import ClassifierRecipe

        model = ClassifierRecipe
    elif data.get("task") == "diffusion":
        from distill.diffusion.recipe import DiffusionRecipe

        model = DiffusionRecipe
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _readable(error, model) from None


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Recipe from a YAML path, `builtin:<name>`, a dict or a Recipe, with `--set` overrides."""
    if isinstance(source, BaseModel):  # a Recipe or ClassifierRecipe
        return parse_recipe(source.model_dump(mode="json"), overrides)
    if isinstance(source, dict):
        return parse_recipe(dict(source), overrides)
    path = builtin_recipe_path(str(source)) if str(source).startswith("builtin:") else Path(source)
    if not path.is_file():
        raise DistillError(f"recipe file `{path}` not found", fix="give the path of a YAML recipe, "
                           "e.g. recipes/oracle-demo.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if context is not None and getattr(error, "context", None) and (mark is None or context.line != mark.line):
            where += f" ({error.context} from line {context.line + 1}, column {context.column + 1})"
        raise DistillError(f"`{path}` is not valid YAML{where}: {getattr(error, 'problem', error)}",
                           fix="check indentation and `key: value` pairs there") from None
    return parse_recipe(data if data is not None else {}, overrides)


def builtin_recipe_path(name: str) -> Path:
    """`builtin:oracle-demo` -> the recipe shipped inside the package."""
    stem = name.removeprefix("builtin:")
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{stem}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise DistillError(f"no built-in recipe `{stem}`", fix=f"use one of: {', '.join(known)}")
    return path
