"""The recipe of a causal-LM run (`task: lm`, the default): teacher, student, data, objective,
regime, training and evaluation. Loaded by `distill.core.recipe.load_recipe`, which gives every
problem as a `DistillError` naming the field path and a fix, before any model loads.
"""
from __future__ import annotations

import string
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.core.errors import FieldValueError
from distill.core.recipe import PrivacySpec, RunRecipe, Seed, StrictModel


class TeacherSpec(StrictModel):
    """The model whose distribution the student learns: a model loaded here (`path`), or one served by an
    inference engine (`url`: vLLM's OpenAI-compatible API, or `distill serve`), whose top-k log-probabilities
    of every token arrive over HTTP (docs/served_teacher_protocol.md)."""

    path: str | None = Field(None, description="Local directory, hub id, or `builtin:<task>-teacher`. With `url`: "
                                               "where the teacher's tokenizer and config are read (its weights "
                                               "are not loaded); default the student's (student.path).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The teacher's own dtype; losses always compute in float32.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code (models "
                                                       "transformers does not ship); only for code you trust.")
    url: str | None = Field(None, description="A served teacher: the server's OpenAI-compatible base URL, e.g. "
                                              "http://127.0.0.1:8000/v1 (`vllm serve` or `distill serve`).")
    model: str | None = Field(None, description="url: the served model's name (default: the server's only one).")
    top_k: int = Field(20, gt=0, description="url: log-probabilities per token asked of the server (vLLM's "
                                             "prompt_logprobs; its --max-logprobs must allow it); the rest of "
                                             "the distribution is one tail bucket.")
    sparse: Literal["tail", "renormalize"] = Field(
        "tail", description="url: compare over top-k + one tail bucket (proper distributions), or renormalise the "
                            "teacher's top-k to 1 (as regime.sparse of a cache).")
    api_key_env: str | None = Field(None, description="url: the environment variable holding the server's API key "
                                                      "(sent as a Bearer token; never written anywhere).")
    timeout_s: float = Field(120.0, gt=0, description="url: seconds one request may take before it is retried.")
    retries: int = Field(3, ge=0, description="url: retries of a failed request (doubling backoff from "
                                              "backoff_s), after which the run stops; --resume continues it.")
    backoff_s: float = Field(1.0, ge=0, description="url: the first retry's wait in seconds.")
    max_in_flight: int = Field(2, gt=0, description="url: concurrent requests; the next micro-batches are asked "
                                                    "for while the student trains on this one.")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if self.path is None and self.url is None:
            raise FieldValueError("path", "give `teacher.path` (a model loaded here) or `teacher.url` (a served "
                                          "teacher, e.g. http://127.0.0.1:8000/v1)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise FieldValueError("url", f"`{self.url}` is not an http(s) URL: give the server's base URL, e.g. "
                                         "http://127.0.0.1:8000/v1")
        served = ("model", "api_key_env", "top_k", "sparse", "timeout_s", "retries", "backoff_s", "max_in_flight")
        # (compared with the defaults, not model_fields_set: a recipe re-validated from its dump sets every field)
        unused = [key for key in served if self.url is None and getattr(self, key) != type(self).model_fields[key].default]
        if unused:
            raise FieldValueError(unused[0], f"`teacher.{unused[0]}` is a setting of a served teacher: add "
                                             "teacher.url, or remove it")
        return self

    @property
    def served(self) -> bool:
        return self.url is not None


class LoraSpec(StrictModel):
    """LoRA adapters (peft) on the student: only the adapters train; the run saves the adapter and the
    merged student."""

    r: int = Field(16, gt=0, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear (every linear "
                                  "layer but the output head).")


class StudentSpec(StrictModel):
    """The model being trained: a saved model (`path`) or the teacher's config with overrides."""

    path: str | None = Field(None, description="Local directory or hub id of a causal LM.")
    config: dict[str, Any] | None = Field(
        None, description="Overrides of the teacher's config, e.g. {hidden_size: 64, num_hidden_layers: 2}.")
    init_from_teacher_layers: list[int] | None = Field(
        None, description="Copy these teacher layers (and embeddings/head) into the student; "
                          "needs the same hidden size. Default: random init.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="The student's weights (and optimizer state): bfloat16 is pure-bf16 training, "
                               "half the memory of weights, gradients and Adam moments, but updates below bf16's "
                               "resolution are lost; train.precision: bf16 keeps float32 master weights instead.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters on the student instead of all its weights.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code (student.path).")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `student.path` (a saved model) or `student.config` "
                             "(overrides of the teacher's config, `{}` for a copy of its shape)")
        if self.init_from_teacher_layers is not None and self.config is None:
            raise FieldValueError("init_from_teacher_layers",
                                   "`init_from_teacher_layers` needs `student.config` (a student built from "
                                   "the teacher's config)")
        return self


class DataSpec(StrictModel):
    """Training and evaluation data: a built-in task or local jsonl/parquet files."""

    builtin: Literal["oracle", "arithmetic"] | None = Field(None, description="A built-in task (regime preference: "
                                                                              "its preference pairs; arithmetic "
                                                                              "has them).")
    train: str | None = Field(None, description="jsonl/json/parquet/csv with prompt+completion, text, or messages "
                                                "rows (regime preference: prompt or messages + chosen + "
                                                "rejected), or a Hugging Face dataset: a save_to_disk directory, a "
                                                "dataset script or data directory, or a hub id.")
    eval: str | None = Field(None, description="Eval file or dataset; default: `eval_split` of the train dataset, "
                                               "else the last `eval_size` train rows.")
    split: str = Field("train", description="The split of a dataset given as data.train.")
    eval_split: str | None = Field(None, description="The split of data.eval (a dataset), or of data.train when "
                                                     "no data.eval is given (e.g. test).")
    fields: dict[str, str] | None = Field(
        None, description="Our field names -> the data's columns, e.g. {prompt: instruction, completion: response} "
                          "or {messages: conversations}; fields: prompt, completion, text, messages, id "
                          "(and chosen, rejected: preference pairs).")
    train_size: int = Field(2000, gt=0, description="Examples generated for a built-in task (without data.train).")
    eval_size: int = Field(200, gt=0, description="Eval examples (built-in) or held-out rows (files).")
    seed: Seed = Field(0, description="Seed of the built-in task's sampled data.")
    max_length: int = Field(256, gt=1, description="Tokens per example, prompt included.")
    too_long: Literal["truncate", "refuse"] = Field(
        "truncate", description="Examples over max_length: cut with a warning, or refuse the run.")
    completion_only: bool = Field(True, description="Loss on completion tokens only (prompt masked).")
    weights: str | None = Field(None, description="A column of data.train holding each row's weight (>= 0, e.g. "
                                                  "`distill select`'s `weight`): rows are drawn with probability "
                                                  "proportional to it (weight 0: never).")
    packing: bool = Field(False, description="Pack whole training examples into max_length blocks (no padding "
                                             "waste): position ids restart per example and attention stays "
                                             "within it, so each computes what it would alone; prompt tokens "
                                             "stay masked. For regimes off_policy and cache; eval is unpacked.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if self.builtin is None and self.train is None:
            raise ValueError("give `data.builtin` (oracle | arithmetic) or `data.train` (a file), or both (your "
                             "training rows, the task's evaluation)")
        if self.eval is not None and (self.train is None or self.builtin is not None):
            raise FieldValueError("eval", "built-in tasks make their own eval set: remove `data.eval`"
                                  + ("" if self.train is None else " (data.train's rows are scored on the task's)"))
        if self.weights is not None and self.train is None:
            raise FieldValueError("weights", "data.weights names a column of data.train; built-in rows have none")
        if self.weights is not None and self.packing:
            raise FieldValueError("weights", "packed blocks hold several rows of different weights: set "
                                  "data.packing false to weight rows")
        if self.train is None and (self.fields is not None or self.eval_split is not None):
            raise FieldValueError("fields" if self.fields is not None else "eval_split",
                                  "data.fields / data.eval_split apply to data.train; built-in tasks have their own")
        known = ("prompt", "completion", "text", "messages", "id", "chosen", "rejected")
        unknown = [key for key in self.fields or {} if key not in known]
        if unknown:
            raise FieldValueError("fields", f"data.fields maps our fields ({', '.join(known)}) to your columns; "
                                            f"`{', '.join(unknown)}` is not one of ours (write `ours: yours`)")
        return self


class TaidSpec(StrictModel):
    """TAID's interpolation schedule (Shing et al. 2025): t rises from t_start to t_end, faster
    while the loss keeps falling (momentum of the relative loss change). It drives the losses whose registry
    spec says `schedule: taid`, setting their parameter `t` each step."""

    SCHEDULE: ClassVar[str] = "taid"  # the LossSpec.schedule this section drives
    PARAMETER: ClassVar[str] = "t"  # the loss parameter it sets each step

    t_start: float = Field(0.4, ge=0, lt=1)
    t_end: float = Field(1.0, gt=0, le=1)
    alpha: float = Field(5e-4, ge=0, le=1, description="Step size of the adaptive update.")
    beta: float = Field(0.99, ge=0, le=1, description="Momentum of the relative loss change.")
    adaptive: bool = Field(True, description="False: t follows the linear ramp only.")

    @model_validator(mode="after")
    def _rising(self) -> "TaidSpec":
        if self.t_start > self.t_end:
            raise FieldValueError("t_start", f"t rises from t_start to t_end, so t_start ({self.t_start:g}) must not "
                                             f"exceed t_end ({self.t_end:g}): e.g. t_start 0.4, t_end 1.0")
        return self


class ObjectiveSpec(BaseModel):
    """The distillation loss; extra keys are the loss's own parameters (e.g. `beta` for jsd). The loss and
    its parameters are checked against the loss registry (`distill losses`, table `objective.loss`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)
    loss: str = Field("forward_kl", description="A token divergence from `distill losses` (an alias becomes "
                                                "its canonical name).")
    temperature: float = Field(1.0, gt=0, description="Divides both logits (no T^2 factor, as GKD/TRL).")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the divergence term.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of hard-label cross-entropy mixed in.")
    entropy_weight: float = Field(0.0, description="Adds entropy_weight * H(student): > 0 sharpens the student "
                                                   "(as TSD-KD), < 0 is a confidence penalty (Pereyra et al. 2017).")
    token_selection: float | None = Field(None, gt=0, le=1, description="Distil only this fraction of tokens, "
                                          "those where the student is least sure relative to the teacher (TSD-KD).")
    taid: "TaidSpec | None" = Field(None, description="TAID's adaptive schedule of t (losses with schedule taid, "
                                                      "i.e. `taid`); default {} when the loss has no fixed t.")
    overlap_loss: str | None = Field(None, description="Cross-tokenizer losses: also this token divergence (e.g. "
                                     "forward_kl) between the aligned chunks' rows restricted to the vocabulary "
                                     "entries both tokenizers share, renormalised there.")
    overlap_weight: float = Field(1.0, ge=0, description="Weight of the overlap_loss term.")

    @model_validator(mode="after")
    def _known_loss_and_params(self) -> "ObjectiveSpec":
        from distill.losses import LossParameterError, check_params, get_spec, specs

        extra = self.model_extra or {}
        try:
            try:
                spec = get_spec(self.loss, kind="token")
            except LossParameterError as error:  # a cross-tokenizer or preference loss, else the token kind's message
                def named(kind):
                    return {s.name for s in specs(kind)} | {a for s in specs(kind) for a in s.aliases}
                kind = next((kind for kind in ("cross_token", "preference") if self.loss in named(kind)), None)
                if kind is None:
                    cross, pairs = (", ".join(s.name for s in specs(kind)) for kind in ("cross_token", "preference"))
                    raise LossParameterError(f"{error}; for a teacher and student with different tokenizers: "
                                             f"{cross}; for pairs of completions (regime.kind preference): {pairs}",
                                             field=error.field, fix=error.fix) from None
                spec = get_spec(self.loss, kind=kind)
            checked = check_params(spec.name, extra, kind=spec.kind, field_prefix="")
        except LossParameterError as error:  # field None: the name itself, whose message lists the known ones
            message = str(error) + (f"; {error.fix}" if error.field is not None and error.fix else "")
            raise FieldValueError(error.field or "loss", message) from None
        # (not assignment: that would re-run this validator)
        self.__dict__["loss"] = spec.name
        extra.update({key: checked[key] for key in extra})  # coerced: PyYAML reads `1e-3` as a string
        scheduled = spec.schedule == TaidSpec.SCHEDULE
        if self.taid is not None and not scheduled:
            names = ", ".join(s.name for s in specs("token") if s.schedule == TaidSpec.SCHEDULE)
            raise FieldValueError("taid", f"`objective.taid` (the schedule) needs a loss it drives ({names}); "
                                          f"`{spec.name}` has no schedule")
        if scheduled:
            # A fixed parameter is a constant interpolation; without it, the schedule sets it each step.
            parameter = TaidSpec.PARAMETER
            if parameter in extra and self.taid is not None:
                raise FieldValueError(parameter, f"give either a fixed `{parameter}` or the schedule "
                                                 "`objective.taid`, not both")
            if parameter not in extra and self.taid is None:
                self.__dict__["taid"] = TaidSpec()
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train on")
        if self.overlap_loss is not None:
            if spec.kind != "cross_token":
                raise FieldValueError("overlap_loss", "overlap_loss adds a divergence on the shared vocabulary of a "
                                      "cross-tokenizer loss (uld | gold_hybrid | alm): remove it, or use one of those")
            try:
                overlap = get_spec(self.overlap_loss, kind="token")
            except LossParameterError as error:
                raise FieldValueError("overlap_loss", str(error)) from None
            if overlap.params or overlap.schedule:
                raise FieldValueError("overlap_loss", f"`{overlap.name}` has parameters; overlap_loss takes a "
                                      "parameter-free divergence (forward_kl, reverse_kl, tvd)")
            self.__dict__["overlap_loss"] = overlap.name
        if spec.kind == "cross_token" and (self.entropy_weight != 0 or self.token_selection is not None):
            raise FieldValueError("entropy_weight" if self.entropy_weight != 0 else "token_selection",
                                  f"`{spec.name}` compares aligned chunks of two tokenizations; entropy_weight and "
                                  "token_selection apply to same-tokenizer losses only: remove it")
        if spec.kind == "preference":  # log-probabilities of whole completions, at temperature 1
            unused = [name for name, value, default in (("temperature", self.temperature, 1.0), (
                "entropy_weight", self.entropy_weight, 0.0), ("token_selection", self.token_selection, None))
                if value != default]
            if unused:
                raise FieldValueError(unused[0], f"`{spec.name}` scores whole completions (chosen, rejected) at "
                                                 f"temperature 1; `{unused[0]}` applies to token losses: remove it")
        return self

    @property
    def cross_tokenizer(self) -> bool:
        """A loss for a teacher and student with different tokenizers (`distill losses`: cross_token)."""
        from distill.losses import specs

        return self.loss in {spec.name for spec in specs("cross_token")}

    def loss_params(self) -> dict[str, Any]:
        """The loss-specific parameters with their defaults filled in."""
        from distill.losses import check_params

        kind = "cross_token" if self.cross_tokenizer else "preference" if self.preference else "token"
        return check_params(self.loss, self.model_extra or {}, kind=kind, field_prefix="")

    @property
    def preference(self) -> bool:
        """A loss over pairs of completions, chosen and rejected (`distill losses`: preference; regime preference)."""
        from distill.losses import specs

        return self.loss in {spec.name for spec in specs("preference")}


class OPDSpec(StrictModel):
    """regime `opd`'s options (distill/losses/policy.py), each off by default (plain REINFORCE, k1 reward)."""

    estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Token reward -k(lp_S, lp_T) with Schulman's KL estimators: k1 = lp_S - lp_T (the exact "
                          "reverse-KL gradient), k2 = (lp_T - lp_S)^2 / 2, k3 = r - 1 - log r (lower variance, biased "
                          "as rewards), as KDRL compares them.")
    reward_clip: float | None = Field(None, gt=0, description="Clip each token's reward to [-c, c].")
    baseline: Literal["none", "batch"] = Field("none", description="batch: subtract the mean token reward of the "
                                                                   "micro-batch (variance reduction).")
    gate: float | None = Field(None, description="Quality gate (KEPO's idea): samples whose mean teacher log-prob "
                                                 "per token is below this get weight `gated_weight`.")
    gated_weight: float = Field(0.0, ge=0, le=1, description="Weight of a gated sample (0: dropped).")
    reference: str | None = Field(None, min_length=1, description="The reference of the reward correction at "
                                  "scale != 1 (G-OPD): a causal LM (e.g. the teacher's own base model before its RL); "
                                  "default: the initial student.")
    ratio_clip: float | None = Field(None, gt=0, lt=1, description="Offline OPD (regime.rollouts): PPO clip "
                                     "epsilon of each token's importance ratio p_S / p_rollout, the rollouts being "
                                     "samples of an earlier student (e.g. 0.2); none: the ratio unclipped.")
    teacher_consistency: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="Offline OPD: a teacher other than the one the rollouts' student was fine-tuned on "
                              "(Lightning OPD's teacher consistency) is refused, warned about, or not checked.")
    sft_teacher: str | None = Field(None, min_length=1, description="Offline OPD: the teacher whose outputs the "
                                    "sampling student was fine-tuned on (default: read from the distill run that "
                                    "saved the student).")


class PreferenceSpec(StrictModel):
    """regime `preference`'s options (distill/lm/preference.py); the loss itself is objective.loss."""

    reference: Literal["initial", "teacher"] = Field(
        "initial", description="dpo: the reference model pi_ref: `initial`, a frozen copy of the initial student "
                               "(a LoRA student's base with its adapters disabled), as DPO's SFT model; `teacher`, "
                               "the teacher, as LLaVA-MoD's preference distillation (the student must beat the "
                               "teacher's own chosen-vs-rejected margin).")
    teacher_reference: str | None = Field(
        None, min_length=1, description="adpa: the aligned teacher's own reference (its SFT model before preference "
                                        "alignment), a causal LM of the student's tokenizer; the teacher's advantage "
                                        "is log p_teacher - log p_teacher_reference.")


class RegimeSpec(StrictModel):
    """Where the training sequences and the teacher signal come from."""

    kind: Literal["off_policy", "on_policy", "opd", "sequence", "self", "cache", "preference"] = Field(
        "off_policy", description="off_policy: dataset sequences scored by a live teacher; on_policy (GKD): with "
                                  "probability lmbda a batch's completions are sampled from the current student; "
                                  "opd: student samples, per-token teacher reward, policy gradient; "
                                  "sequence: the teacher completes the prompts once, the student learns its text; "
                                  "self (OPSD): the teacher is the student given privileged context; "
                                  "cache: the teacher's stored top-k (`distill cache`), no teacher in memory; "
                                  "preference: pairs of completions (chosen, rejected) trained with a preference "
                                  "loss (objective.loss dpo | redi | dckd).")
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
    opd: OPDSpec = Field(default_factory=OPDSpec, description="opd: KL estimator, reward clipping, baseline, "
                                                               "quality gate, reference model.")
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec, description="preference: the DPO "
                                                                                   "reference model.")
    rollouts: str | None = Field(None, description="opd: offline on-policy distillation (Lightning OPD): the "
                                 "directory `distill rollouts` writes the student's samples of the training prompts "
                                 "to; training reads them instead of sampling. With `path`, the teacher's "
                                 "log-probs come from that cache and no teacher loads.")
    path: str | None = Field(None, description="cache: the directory `distill cache` writes and training reads "
                                               "(regime cache, or opd with rollouts: the teacher's scores of them).")
    k: int = Field(64, gt=0, description="cache: top-k entries per token to store (training may use fewer); "
                                         "unset: 64, or the whole vocabulary when it is smaller.")
    ids: Literal["rice", "packed"] = Field("rice", description="cache: token-id coding; rice (sorted ids, "
                                           "Golomb-Rice gaps) or packed (ceil(log2 V) bits each).")
    values: Literal["int8", "float16"] = Field("int8", description="cache: log-prob storage; int8 quantised per "
                                               "token or float16.")
    shard_examples: int = Field(256, gt=0, description="cache: examples per shard file (the unit of resume).")
    sparse: Literal["tail", "renormalize"] = Field(
        "tail", description="cache: compare over top-k + one tail bucket (proper distributions), or renormalise "
                            "the teacher's top-k to 1.")

    @field_validator("privileged_template")
    @classmethod
    def _fills_in(cls, template: str) -> str:
        # Checked here, not when the self regime formats each row after the models have loaded.
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            unknown = sorted(names - {"privileged", "prompt"})
            if not unknown:
                template.format(privileged="privileged", prompt="prompt")
        except (ValueError, IndexError, KeyError) as error:
            raise ValueError(f"`{template}` is not a format string with {{privileged}} and {{prompt}} ({error}); "
                             "write literal braces as {{ and }}") from None
        if unknown:
            raise ValueError(f"`{template}` names {', '.join(f'{{{n}}}' for n in unknown)}; the template has "
                             "{privileged} (the row's privileged_field) and {prompt} only")
        return template

    @model_validator(mode="after")
    def _available(self) -> "RegimeSpec":
        if self.kind == "self" and "lmbda" not in self.model_fields_set:
            self.__dict__["lmbda"] = 1.0  # on-policy self-distillation samples every batch by default
        if self.rsd_threshold > 0 and self.kind != "sequence":
            raise FieldValueError("rsd_threshold", f"rsd_threshold filters teacher generations, which only regime "
                                                    f"`sequence` makes (this is `{self.kind}`); remove it or set "
                                                    "kind: sequence")
        if self.kind == "cache" and not self.path:
            raise FieldValueError("path", "regime `cache` needs `path`, the cache directory")
        if self.opd != OPDSpec() and self.kind != "opd":  # (a resolved recipe.yaml lists the defaults: fine)
            raise FieldValueError("opd", f"regime.opd holds options of kind `opd` (this is `{self.kind}`); remove it "
                                         "or set kind: opd")
        if self.rollouts is not None and self.kind != "opd":
            raise FieldValueError("rollouts", f"rollouts feed offline on-policy distillation (kind opd; this is "
                                              f"`{self.kind}`); remove regime.rollouts or set kind: opd")
        if self.kind == "opd" and self.path is not None and self.rollouts is None:
            raise FieldValueError("path", "regime opd reads a teacher cache of stored rollouts only; add "
                                          "regime.rollouts (distill rollouts), or remove regime.path")
        if self.rollouts is not None and (self.reward is not None or self.group_size > 1):
            raise FieldValueError("reward" if self.reward is not None else "group_size",
                                  "offline OPD (regime.rollouts) trains on one stored sample per prompt with the "
                                  "teacher's token rewards; sequence rewards and groups need samples drawn during "
                                  "training: remove regime.rollouts, or the reward / group_size")
        if self.kind == "opd" and self.rollouts is None:
            offline = [name for name in ("ratio_clip", "sft_teacher") if getattr(self.opd, name) is not None]
            if offline:
                raise FieldValueError(f"opd.{offline[0]}", "applies to stored rollouts (regime.rollouts): online OPD "
                                                           "samples from the current student; remove it or add "
                                                           "regime.rollouts")
        if self.opd.reference is not None and self.scale == 1.0:
            raise FieldValueError("opd.reference", "at scale 1 the reference cancels out of the reward; set "
                                                   "regime.scale (e.g. 1.25, ExOPD) or remove opd.reference")
        return self


class TrainSpec(StrictModel):
    """Optimisation. `batch_size` is per process and micro-step (as in HF `per_device_*`)."""

    steps: int = Field(400, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients; null to disable.")
    seed: Seed = Field(0, description="Student init and data order.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between resumable checkpoints.")
    log_every: int = Field(10, gt=0, description="Steps between loss records.")
    baseline: bool = Field(True, description="Also train the student alone on hard labels (the 'alone' row).")
    same_tokenizer_reference: bool = Field(
        False, description="Cross-tokenizer runs: also train a student of the same size on the teacher's tokenizer "
                           "with forward KL (the 'same_tokenizer' row): what a shared tokenizer would have given.")
    threads: int | None = Field(None, gt=0, le=4096, description="torch.set_num_threads; default: torch's choice.")
    fused_loss: bool = Field(True, description="Chunked fused-linear loss: full-vocabulary logits never exist "
                                               "for all tokens at once (falls back to plain logits where a "
                                               "model or loss does not allow it).")
    loss_memory_mb: float = Field(512, gt=0, description="Memory budget (MiB) of one chunk of the fused loss.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="The student's forward/backward: fp32, or autocast to bf16 / fp16 with float32 master "
                            "weights and optimizer state (fp16 with a gradient scaler). The teacher keeps "
                            "teacher.dtype; losses compute in float32.")
    privacy: PrivacySpec | None = Field(None, description="DP-SGD on the student (opacus): {epsilon, delta, "
                                                          "max_grad_norm}; the report states the epsilon spent.")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp (each holds the full teacher and student) or fsdp "
                           "(PyTorch FSDP2: each holds 1/N of every teacher and student parameter, gradient "
                           "and optimizer state; decoder layers sharded one by one). One process: unsharded.")
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in the "
                                                            "backward pass (transformers' own): less memory, ~30% "
                                                            "more compute.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise FieldValueError("warmup_steps",
                                   f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class EvalSpec(StrictModel):
    """Evaluation during and after training."""

    every: int = Field(100, gt=0, description="Steps between evals (metrics.jsonl).")
    batch_size: int = Field(32, gt=0)
    generate_size: int = Field(64, ge=0, description="Eval examples scored by generation (exact match and ROUGE-L "
                                                     "F1 of the answers of prompt/completion and chat rows).")
    sample_temperature: float = Field(0.0, ge=0, description="Temperature of those generations: 0 is greedy; > 0 "
                                                              "samples (seeded by data.seed, the same for every row).")
    metric: Literal["exact_match", "rouge_l", "nll"] | None = Field(
        None, description="The primary metric (the verdict and best-eval lines): default exact_match for "
                          "prompt/completion rows, rouge_l for chat rows, nll for text; a built-in task has its own.")
    throughput_tokens: int = Field(64, gt=0, description="New tokens per sequence when timing generation.")


class LMRecipe(RunRecipe):
    """Everything about one causal-LM run. Every field has a default where one is sensible."""

    task: Literal["lm"] = "lm"
    teacher: TeacherSpec
    student: StudentSpec
    assistants: list[StudentSpec] = Field(
        default_factory=list, description="Teaching assistants (TAKD): each is distilled from the one before (the "
                                          "first from `teacher`, `config` overriding that one's config), and the "
                                          "student from the last.")
    data: DataSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    regime: RegimeSpec = Field(default_factory=RegimeSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _preference_fits(self) -> "LMRecipe":
        """Preference losses go with regime preference and it with them (distill/lm/preference.py)."""
        regime, loss = self.regime, self.objective.loss
        if regime.kind != "preference":
            if self.objective.preference:
                raise FieldValueError("objective.loss", f"`{loss}` is a preference loss over pairs of completions "
                                      "(chosen, rejected): set regime.kind: preference, or use a token loss such as "
                                      "forward_kl")
            if regime.preference != PreferenceSpec():
                raise FieldValueError("regime.preference", f"regime.preference holds options of kind `preference` "
                                      f"(this is `{regime.kind}`); remove it or set kind: preference")
            return self
        if not self.objective.preference:
            raise FieldValueError("objective.loss", f"regime preference trains with a preference loss (dpo | redi | "
                                  f"dckd); `{loss}` is a token loss: set objective.loss, e.g. dpo")
        if (loss == "adpa") != (regime.preference.teacher_reference is not None):
            raise FieldValueError("regime.preference.teacher_reference",
                                  "adpa needs the aligned teacher's reference model (its SFT model): set "
                                  "regime.preference.teacher_reference" if loss == "adpa" else
                                  f"teacher_reference is ADPA's; `{loss}` does not use it: remove it")
        if loss == "adpa" and self.teacher.served:
            raise FieldValueError("teacher.url", "adpa reads the teacher's whole next-token distributions on the "
                                  "student's samples, from a teacher in memory: use teacher.path (not a server)")
        if regime.preference.reference == "teacher" and loss != "dpo":
            raise FieldValueError("regime.preference.reference", f"the reference model is DPO's; `{loss}` has none: "
                                  "remove regime.preference.reference, or use objective.loss dpo")
        needs_teacher = loss == "dckd" or (loss == "dpo" and regime.preference.reference == "teacher")
        if needs_teacher and self.teacher.served:
            raise FieldValueError("teacher.url", f"`{loss}` here reads the teacher's "
                                  f"{'whole next-token distributions' if loss == 'dckd' else 'sequence log-probs'}, "
                                  "from a teacher in memory: use teacher.path (not a server)")
        if self.data.packing:
            raise FieldValueError("data.packing", "regime preference keeps each chosen and rejected completion whole, "
                                  "as a pair: set data.packing false")
        if not self.data.completion_only:
            raise FieldValueError("data.completion_only", "preference losses score the completions (chosen, "
                                  "rejected) given their prompt: set data.completion_only true")
        if self.train.sharding == "fsdp":
            raise FieldValueError("train.sharding", "regime preference is not sharded yet: use train.sharding ddp")
        return self

    @model_validator(mode="after")
    def _task_available(self) -> "LMRecipe":
        if self.train.sharding == "fsdp" and self.train.precision == "fp16":
            raise FieldValueError("train.precision", "fp16 with train.sharding fsdp is not supported (the gradient "
                                  "scaler's skip decision is per process, so processes could diverge): use bf16")
        if self.train.sharding == "fsdp" and self.student.lora is not None:
            raise FieldValueError("train.sharding", "LoRA students are not sharded yet: use train.sharding ddp "
                                  "with student.lora (the adapters are small; the teacher is what needs sharding)")
        if self.student.dtype == "bfloat16" and self.train.precision == "fp16":
            raise FieldValueError("train.precision", "student.dtype bfloat16 with train.precision fp16 mixes two "
                                  "half precisions: use train.precision bf16 (or fp32) with a bfloat16 student")
        if self.eval.metric is not None and self.data.builtin is not None:
            raise FieldValueError("eval.metric", f"the built-in task {self.data.builtin} scores with its own metric: "
                                                 "remove eval.metric")
        if self.data.packing and self.regime.kind not in ("off_policy", "cache"):
            raise FieldValueError("data.packing", f"regime {self.regime.kind} samples a completion for each "
                                  "example's prompt, one sequence per row, so there is nothing to pack: set "
                                  "data.packing false (packing applies to regimes off_policy and cache)")
        if self.teacher.served:
            if self.teacher.path is None and self.student.path is None:
                raise FieldValueError("teacher.path", "a served teacher's tokenizer and config are read from "
                                      "teacher.path (a directory with them; its weights are not loaded) or, without "
                                      "it, from student.path: give one of them")
            if self.regime.rsd_threshold > 0:
                raise FieldValueError("regime.rsd_threshold", "student-aware filtering needs the teacher's "
                                      "distribution at every token it proposes, in step with the student: not "
                                      "available from a served teacher (use teacher.path, or rsd_threshold 0)")
        if self.train.privacy is not None:
            privacy_problem = next(((field, why) for field, why, bad in (
                ("regime.kind", f"regime {self.regime.kind} trains on pairs or with a separate teacher copy; DP "
                 "needs one row per gradient", self.regime.kind in ("preference", "self")),
                ("regime.opd.baseline", "a batch baseline mixes the rows of a batch: one row's gradient would "
                 "depend on the others", self.regime.opd.baseline != "none"),
                ("regime.group_size", "grouped samples share a baseline across rows", self.regime.group_size > 1),
                ("train.grad_accum", "the DP batch is one Poisson draw per step", self.train.grad_accum > 1),
                ("train.sharding", "DP training runs in one process so far", self.train.sharding == "fsdp"),
                ("train.precision", "fp16 loss scaling is not combined with per-row clipping",
                 self.train.precision == "fp16"),
                ("data.packing", "a packed block holds several rows", self.data.packing),
                ("data.weights", "weighted draws are not Poisson sampling: the accountant would not hold",
                 self.data.weights is not None)) if bad), None)
            if privacy_problem is not None:
                raise FieldValueError(privacy_problem[0], f"with train.privacy: {privacy_problem[1]}")
        if self.data.weights is not None and self.regime.kind == "preference":
            raise FieldValueError("data.weights", "preference pairs are not weighted yet: remove data.weights")
        if self.assistants:
            chain_problem = ("regime.path", "a top-k cache holds one teacher's signals; a chain has several") \
                if self.regime.path else ("regime.rollouts", "offline rollouts are scored by one teacher") \
                if self.regime.rollouts else ("objective.loss", "a cross-tokenizer chain is not built yet") \
                if self.objective.cross_tokenizer else ("train.sharding", "a chain runs its stages in one "
                                                        "process") if self.train.sharding == "fsdp" else \
                ("regime.kind", "the self regime has no separate teacher") if self.regime.kind == "self" else None
            if chain_problem is not None:
                raise FieldValueError(chain_problem[0], f"with `assistants`: {chain_problem[1]}")
            for index, assistant in enumerate(self.assistants):
                if assistant.lora is not None:
                    raise FieldValueError(f"assistants.{index}.lora", "an assistant becomes the next stage's "
                                          "teacher: train all its weights (remove lora)")
        if self.train.same_tokenizer_reference and not self.objective.cross_tokenizer:
            raise FieldValueError("train.same_tokenizer_reference", "the same-tokenizer reference is a row of "
                                  "cross-tokenizer runs (objective.loss uld | gold_hybrid | alm): remove it")
        if self.objective.cross_tokenizer:
            if self.regime.kind not in ("off_policy", "on_policy", "sequence", "cache"):
                raise FieldValueError("regime.kind", f"cross-tokenizer losses train off_policy, on_policy, sequence "
                                      f"or from a cache so far; regime {self.regime.kind} with "
                                      f"`{self.objective.loss}` is not built yet")
            params = self.objective.loss_params()
            if self.objective.overlap_loss is not None and (self.regime.kind == "cache" or self.teacher.served):
                raise FieldValueError("objective.overlap_loss", "overlap_loss reads the teacher's whole next-token "
                                      "distribution: use a teacher in memory (not a cache or a server)")
            if ((params.get("debias") or params.get("merge_threshold", 0) > 0)
                    and (self.regime.kind == "cache" or self.teacher.served)):
                raise FieldValueError("objective.debias" if params.get("debias") else "objective.merge_threshold",
                                      "ALM's debiasing and merging read the teacher's whole next-token distribution "
                                      "after each chunk: use a teacher in memory (not a cache or a server)")
            if (self.regime.kind == "cache" and self.objective.temperature != 1
                    and self.objective.loss in ("alm", "gold_hybrid")):
                raise FieldValueError("objective.temperature", f"from a cache, `{self.objective.loss}` reads the "
                                      "teacher's log-probabilities as cached (temperature 1): set objective.temperature "
                                      "1, or use a live teacher")
            if self.regime.rsd_threshold > 0:
                raise FieldValueError("regime.rsd_threshold", "student-aware filtering compares the two models token "
                                      "by token, which needs one tokenizer: set it to 0 for cross-tokenizer KD")
            if self.student.path is None:
                raise FieldValueError("student.path", "a cross-tokenizer student has its own tokenizer: give "
                                      "student.path (a saved model and tokenizer), not student.config")
            if self.data.packing:
                raise FieldValueError("data.packing", "cross-tokenizer losses do not take packed data yet")
            if self.train.same_tokenizer_reference and (self.teacher.served or self.regime.kind == "cache"):
                raise FieldValueError("train.same_tokenizer_reference", "the same-tokenizer reference row trains "
                                      "against the teacher in memory: use teacher.path without a cache or a server")
            if self.teacher.served and self.teacher.path is None:
                raise FieldValueError("teacher.path", "a served teacher with another tokenizer than the student's "
                                      "needs its tokenizer here: teacher.path (a directory with it; no weights)")
            if self.teacher.served and self.regime.kind not in ("off_policy", "on_policy"):
                raise FieldValueError("regime.kind", "a served cross-tokenizer teacher scores off_policy and "
                                      "on_policy rows so far (sequence: generate with the server, then train "
                                      "off_policy on the text; cache: build it from the server)")
        if self.regime.kind == "opd" and self.train.batch_size % self.regime.group_size:
            raise FieldValueError("regime.group_size", f"regime.group_size={self.regime.group_size} must divide "
                                  f"train.batch_size={self.train.batch_size} (the batch counts samples: batch_size / "
                                  "group_size prompts)")
        return self
