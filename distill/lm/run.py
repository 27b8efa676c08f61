"""A causal-LM run: recipe -> tokenizer, data, teacher signal, student -> regime, trainer -> rows.

`prepare` loads and checks everything (nothing written); `LMJob.run` trains the distilled student and
the student alone (same init, data order and steps, hard labels) and evaluates three rows on the same
eval data: teacher, alone, distilled. The skeleton around it is core's (`core.run.run_recipe`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import os
import sys
import time
import warnings
from types import SimpleNamespace

import torch

from distill.core.errors import DistillError
from distill.core.families import Job
from distill.core.rundir import RunDirectory, RunResult
from distill.lm.cross_tokenizer.data import nll_per_character, pair_examples
from distill.lm.cross_tokenizer.regime import (CachedTokenLogprobs, CrossDistill, CrossObjective, CrossOnPolicy,
                                               boundary_mask, matched_vocabulary, teacher_text_pairs)
from distill.lm.data import check_packing, load_data, row_weights
from distill.lm.evaluate import evaluate_model
from distill.lm.models import (DTYPES, apply_lora, build_student, check_same_vocabulary, load_causal_lm, load_config,
                               load_tokenizer, make_accelerator, quiet_transformers, resolve_model_path, save_model,
                               transformers_model, weights_sha256)
from distill.lm.objective import TokenObjective
from distill.lm.preference import load_preference_data, preference_regime, rejected_examples
from distill.lm.recipe import LMRecipe, ObjectiveSpec
from distill.lm.regimes import OPD, Distill, OnPolicy, SelfDistill, sampling_settings
from distill.lm.rollouts import check_teacher_consistency, load_rollouts
from distill.lm.sharding import (gather_full_state, gathered_all, is_sharded, load_sharded_causal_lm, local_share,
                                 on_device, shard_causal_lm, sharding_applies)
from distill.lm.tasks import get_task
from distill.lm.tasks.completions import CompletionsScorer
from distill.lm.teacher.cache.store import (CachedTeacher, TeacherCache, identity_differences,
                                            recipe_teacher_identity, tokenizer_sha256)
from distill.lm.teacher.live import LiveTeacher
from distill.lm.teacher.served import ServedTeacher, connect, served_row
from distill.lm.teacher.sequences import teacher_sequences
from distill.lm.trainer import LMTrainer, check_precision, fsdp_param_dtype

ROW_DIRS = {"alone": "alone", "distilled": "student", "same_tokenizer": "same-tokenizer"}  # each trained row's model


def sharded_run(recipe: LMRecipe, accelerator) -> bool:
    return sharding_applies(recipe.train.sharding, accelerator.num_processes)


def load_sharded(path: str, field: str, dtype, trust_remote_code: bool, *, trainable: bool, mixed_precision=None):
    """The model at `path` loaded straight into shards (distill/lm/sharding.py), or None where its files do
    not allow it (the caller loads it whole and shards it)."""
    from pathlib import Path

    location = resolve_model_path(path, field)
    if not Path(location).is_dir():  # a hub id: transformers resolves the files
        return None
    return load_sharded_causal_lm(location, load_config(path, field, trust_remote_code), dtype=dtype,
                                  trainable=trainable, mixed_precision=mixed_precision,
                                  trust_remote_code=trust_remote_code)


def saved_models(run_dir) -> dict:
    """Row -> directory of the models a run saved (`distill eval RUN`)."""
    return {row: run_dir / name for row, name in ROW_DIRS.items() if (run_dir / name / "config.json").is_file()}


class LMSetup:
    """What both a run and `distill eval` need: tokenizer, data, scorer, and the teacher (live, or its
    cache), with the evaluation of any model on the eval data."""

    def __init__(self, recipe: LMRecipe, *, accelerator=None, need_teacher: bool = True, training: bool = True):
        self.recipe = recipe
        self.accelerator = accelerator or make_accelerator()
        self.task = get_task(recipe.data.builtin) if recipe.data.builtin else None
        if self.task is not None and hasattr(self.task, "per_symbol") and recipe.objective.cross_tokenizer:
            self.task.per_symbol = True  # rows on different tokenizers: metrics per symbol, not per token
        spec = recipe.teacher
        # A served teacher's tokenizer: a local copy (teacher.path, no weights needed), or else the student's.
        source, source_field = ((spec.path, "teacher.path") if spec.path is not None or not spec.served
                                else (recipe.student.path, "student.path"))
        self.cross = recipe.objective.cross_tokenizer  # teacher and student each on their own tokenizer
        self.teacher_tokenizer = load_tokenizer(source, source_field, spec.trust_remote_code)
        # `tokenizer` is the student's: data, evaluation and generation of the trained rows use it
        self.tokenizer = (load_tokenizer(recipe.student.path, "student.path", recipe.student.trust_remote_code)
                          if self.cross else self.teacher_tokenizer)
        loader = load_preference_data if recipe.regime.kind == "preference" else load_data  # pairs, chosen first
        self.train_records, self.eval_records, self.train_examples, self.eval_examples = loader(
            recipe.data, self.tokenizer, self.task)
        if self.cross:  # both sides' tokens of every row, aligned (distill/lm/cross_tokenizer/)
            self.train_pairs, self.eval_pairs = (
                pair_examples(records, self.tokenizer, self.teacher_tokenizer, max_length=recipe.data.max_length,
                              append_eos=self.task.append_eos if self.task else True, field=field)
                for records, field in ((self.train_records, "data.train"), (self.eval_records, "data.eval")))
            self.train_examples = [pair.student for pair in self.train_pairs]
            self.eval_examples = [pair.student for pair in self.eval_pairs]
            if not any(pair.chunks for pair in self.train_pairs):
                raise DistillError("no training row has a completion chunk both tokenizers can align",
                                   field="data.train", fix="check that the rows have non-empty completions")
        self.train_weights = row_weights(self.train_records, recipe.data.weights)  # data.weights, or None
        self.packing = None
        if recipe.data.packing:  # how full the blocks are: the padding packing saves
            tokens = sum(len(e.input_ids) for e in self.train_examples)
            self.packing = {"documents": len(self.train_records), "blocks": len(self.train_examples),
                            "fill": tokens / (len(self.train_examples) * recipe.data.max_length)}
        # What scores a model beyond nll: the built-in task, or greedy exact match on prompt/completion files.
        self.scorer = self.task or CompletionsScorer.for_eval(recipe.eval, self.eval_records, self.tokenizer)
        self.cache, self.eval_cache, self.teacher, self.served = None, None, None, None
        self.teacher_loaded_sharded = False
        # Offline OPD (regime.rollouts): the student's stored samples replace sampling in the distilled phase (the
        # alone row and evaluation keep the data); `distill eval` of such a run needs none of them.
        self.rollout_examples = self.behavior = None
        offline = recipe.regime.kind == "opd" and recipe.regime.rollouts is not None
        if offline and training:
            self.rollout_examples, self.behavior, manifest = load_rollouts(recipe.regime.rollouts, self.train_examples)
            check_teacher_consistency(manifest.get("sft_teacher"), recipe, "regime.rollouts")
        if recipe.regime.kind == "cache" or (offline and recipe.regime.path):
            # (cross-tokenizer: the cache holds the teacher's own tokens; offline OPD: the teacher's scores of the
            # rollouts)
            tokenizer, train, evaluation = ((self.teacher_tokenizer, [p.teacher for p in self.train_pairs],
                                             [p.teacher for p in self.eval_pairs]) if self.cross
                                            else (self.tokenizer, self.train_examples, self.eval_examples))
            if offline:
                train = self.rollout_examples or []
            self.cache, self.train_spans = open_cache(recipe, tokenizer, train)
            self.eval_cache = (self.cache, self.cache.rows_for("eval", evaluation, field="data.eval"))
            if (self.cross or offline) and self.cache.token_logprobs is None:
                raise DistillError(f"the cache at `{recipe.regime.path}` was written before caches kept the "
                                   "teacher's log-probability of each token, which "
                                   f"{'offline OPD' if offline else 'cross-tokenizer ALM'} reads",
                                   field="regime.path", fix="rebuild it with `distill cache <recipe>` into a new "
                                                            "directory")
        elif need_teacher and spec.served:  # checked now: the server answers, with the teacher's tokenizer
            tokenizer = self.teacher_tokenizer
            self.served = ServedTeacher(connect(spec, tokenizer), spec.top_k, len(tokenizer), spec.sparse)
        elif need_teacher:
            # Sharded runs read each process's rows of the teacher only (a teacher larger than one process's
            # memory fits across processes); sequence KD generates with the whole teacher first.
            if sharded_run(recipe, self.accelerator) and recipe.regime.kind != "sequence":
                self.teacher = load_sharded(recipe.teacher.path, "teacher.path", DTYPES[recipe.teacher.dtype],
                                            recipe.teacher.trust_remote_code, trainable=False)
                self.teacher_loaded_sharded = self.teacher is not None
            if self.teacher is None:
                self.teacher = load_causal_lm(recipe.teacher.path, "teacher.path", DTYPES[recipe.teacher.dtype],
                                              recipe.teacher.trust_remote_code).eval()
            self.teacher.requires_grad_(False)
        self.vocab_size = len(self.tokenizer)
        self.token_values: dict[str, dict] = {}  # row -> per-token {nll, kl} of its final evaluation
        self.generations: dict[str, list[str]] = {}  # row -> its first generated answers

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def evaluate(self, model, final: bool = False, row: str | None = None) -> dict:
        """Every metric of `model` on the eval data; `final` also times generation and counts parameters.
        With `row`, its per-token NLL and KL to the teacher and its first generations are kept for the report."""
        recipe = self.recipe
        per_token = {} if row is not None else None
        if self.served is not None and self.eval_cache is None and not self.cross:  # its top-k of the eval data
            self.eval_cache = self.served.table(self.eval_examples, recipe.eval.batch_size, self.pad_token_id)
        metrics = evaluate_model(model, task=self.scorer, tokenizer=self.tokenizer, eval_records=self.eval_records,
                                 eval_examples=self.eval_examples, vocab_size=self.vocab_size,
                                 batch_size=recipe.eval.batch_size, generate_size=recipe.eval.generate_size,
                                 seed=recipe.data.seed, teacher=None if self.cross else self.teacher,
                                 teacher_cache=None if self.cross else self.eval_cache,
                                 throughput_tokens=recipe.eval.throughput_tokens if final else None,
                                 per_token=per_token)
        if self.cross:
            metrics["nll_per_char"] = nll_per_character(metrics["nll"], self.eval_examples, self.eval_pairs)
        if row is not None:
            self.token_values[row] = per_token
            if getattr(self.scorer, "last_answers", None) and recipe.eval.generate_size:
                self.generations[row] = list(self.scorer.last_answers)
        return metrics

    @functools.cached_property
    def teacher_scorer(self):
        """What scores a model on the teacher's tokenizer (cross-tokenizer runs): the task, or the eval rows'
        answers tokenized by the teacher."""
        return self.task or CompletionsScorer.for_eval(self.recipe.eval, self.eval_records, self.teacher_tokenizer)

    def evaluate_on_teacher_tokens(self, model, final: bool = False, row: str | None = None) -> dict:
        """A model on the teacher's tokenizer (the teacher of a cross-tokenizer run, or its same-tokenizer reference):
        its metrics on the teacher's tokens of the eval rows, with agreement and KL to the teacher, and nll_per_char."""
        recipe, per_token, scorer = self.recipe, ({} if row is not None else None), self.teacher_scorer
        examples = [pair.teacher for pair in self.eval_pairs]
        metrics = evaluate_model(model, task=scorer, tokenizer=self.teacher_tokenizer, eval_records=self.eval_records,
                                 eval_examples=examples, vocab_size=len(self.teacher_tokenizer),
                                 batch_size=recipe.eval.batch_size, generate_size=recipe.eval.generate_size,
                                 seed=recipe.data.seed, teacher=self.teacher,
                                 throughput_tokens=recipe.eval.throughput_tokens if final else None,
                                 per_token=per_token)
        metrics["nll_per_char"] = nll_per_character(metrics["nll"], examples, self.eval_pairs)
        if row is not None:
            self.token_values[row] = per_token
            if getattr(scorer, "last_answers", None) and recipe.eval.generate_size:
                self.generations[row] = list(scorer.last_answers)
        return metrics

    def teacher_row(self) -> dict:
        """The teacher's row; from a cache, the evaluation made when the cache was built."""
        if self.teacher is not None and self.cross:  # on its own tokens, scored with its own tokenizer
            return self.evaluate_on_teacher_tokens(on_device(self.teacher, self.accelerator.device), final=True,
                                                   row="teacher")
        if self.teacher is not None:
            return self.evaluate(on_device(self.teacher, self.accelerator.device), final=True, row="teacher")
        if self.served is not None:
            recipe = self.recipe
            # (cross-tokenizer: the teacher's own tokens of the eval rows, scored with its own tokenizer)
            examples = [p.teacher for p in self.eval_pairs] if self.cross else self.eval_examples
            scorer = self.teacher_scorer if self.cross else self.scorer
            row, answers = served_row(self.served, scorer=scorer, records=self.eval_records, examples=examples,
                                      tokenizer=self.teacher_tokenizer, batch_size=recipe.eval.batch_size,
                                      generate_size=recipe.eval.generate_size,
                                      temperature=recipe.eval.sample_temperature, seed=recipe.data.seed,
                                      per_token=(per_token := {}))
            if self.cross:
                row["nll_per_char"] = nll_per_character(row["nll"], examples, self.eval_pairs)
            self.token_values["teacher"] = per_token
            if answers and isinstance(self.scorer, CompletionsScorer):
                self.generations["teacher"] = answers
            return row
        row = dict(self.cache.manifest["teacher_eval"])
        if self.cross:
            row["nll_per_char"] = nll_per_character(row["nll"], [p.teacher for p in self.eval_pairs], self.eval_pairs)
        return row

    def meta(self, rows: dict[str, dict]) -> dict:
        """What the rows mean (results.json `meta`)."""
        entropy = next((row["oracle_entropy"] for row in rows.values() if "oracle_entropy" in row), None)
        notes = [f"oracle entropy (the floor of any model's nll): {entropy:.4f} nats/token"] if entropy is not None else []
        if self.served is not None:
            notes.append(f"teacher served at {self.recipe.teacher.url} (model {self.served.client.model}, top-"
                         f"{self.served.k}): its row holds what the server measures (nll, generated answers); the "
                         "students' teacher_kl is over its top-k + tail")
        if self.packing:
            notes.append(f"packed {self.packing['documents']} training examples into {self.packing['blocks']} blocks "
                         f"of {self.recipe.data.max_length} tokens ({self.packing['fill']:.0%} filled)")
        if self.cross:
            notes.append(f"teacher and student tokenize differently ({self.recipe.objective.loss} over aligned "
                         "chunks): nll is per token of each model's own tokenization, nll_per_char per character of "
                         "the completion text (comparable across rows)")
        if self.recipe.regime.kind == "preference":
            notes.append(f"preference pairs ({self.recipe.objective.loss}): `alone` is SFT on the chosen completions; "
                         "every row is evaluated on the chosen completions of the eval rows")
        return {"primary_metric": self.scorer.metric if self.scorer else ("nll_per_char" if self.cross else "nll"),
                "higher_is_better": self.scorer.higher_is_better if self.scorer else False,
                "hidden_columns": ["oracle_entropy", "oracle_entropy_per_symbol"],  # properties of the eval data
                "notes": notes,
                **({"packing": self.packing} if self.packing else {}),
                **({"generations": {**self.scorer.examples(), **self.generations}}
                   if self.generations else {}),
                "rows_note": "Rows are evaluated on the same eval data; `alone` is the student trained on hard labels "
                             "with the same init, data order and steps."}


def open_cache(recipe: LMRecipe, tokenizer, train_examples) -> tuple[TeacherCache, list[tuple[int, int]]]:
    """The recipe's teacher cache, checked against this run's teacher, tokenizer and data, and the cache
    rows (offset, count) of every training example."""
    regime = recipe.regime
    cache = TeacherCache(regime.path, k=regime.k if "k" in regime.model_fields_set else None)
    built = cache.manifest["identity"]
    current = {"tokenizer_sha256": tokenizer_sha256(tokenizer), "teacher": recipe_teacher_identity(recipe.teacher)}
    differences = identity_differences({k: built[k] for k in current}, current)
    if differences:
        raise DistillError(f"the cache at `{regime.path}` was built with another {', '.join(differences)} than "
                           "this recipe's", field="regime.path",
                           fix="rebuild it with `distill cache <recipe>` into a new directory, or point "
                               "teacher.path at the teacher it was built with")
    # Every training example is cached, with the same tokens: checked now, before any model loads.
    return cache, cache.rows_for("train", train_examples)


def privileged_prompts(recipe: LMRecipe, setup: LMSetup) -> dict[str, list[int]]:
    """Example id -> tokens of the teacher's prompt (privileged context + prompt), for regime self."""
    regime = recipe.regime
    prompts = {}
    for index, (record, example) in enumerate(zip(setup.train_records, setup.train_examples)):
        if not isinstance(record, dict) or "prompt" not in record or regime.privileged_field not in record:
            missing = "prompt" if not isinstance(record, dict) or "prompt" not in record else regime.privileged_field
            raise DistillError(f"regime self: training row {index} has no `{missing}` field", field=(
                "regime.privileged_field" if missing != "prompt" else "data.train"),
                fix="give prompt/completion rows with the privileged field (e.g. a reference solution)")
        text = regime.privileged_template.format(privileged=record[regime.privileged_field], prompt=record["prompt"])
        prompts[example.id] = setup.tokenizer(text).input_ids
    return prompts


def resolve_reward(recipe: LMRecipe, setup: LMSetup):
    """The opd sequence reward function, imported and probed on two training rows before training."""
    spec = recipe.regime.reward
    if spec is None:
        return None
    if spec == "builtin":
        reward_fn = getattr(setup.task, "reward", None)
        if reward_fn is None:
            raise DistillError("`builtin` names the task's own reward, and this data has none", field="regime.reward",
                               fix="use data.builtin: arithmetic, or give `module:function`")
    else:
        module_name, _, function_name = spec.partition(":")
        # The current directory, as `python -m distill` has it; the `distill` console script's sys.path does not
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            reward_fn = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise DistillError(f"cannot import the reward `{spec}`: {error}", field="regime.reward",
                               fix="give `package.module:function`, importable from the current directory") from None
    probe = [r for r in setup.train_records[:2] if isinstance(r, dict) and "prompt" in r and "completion" in r]
    if probe:
        try:
            scores = reward_fn([str(r["prompt"]) for r in probe], [str(r["completion"]) for r in probe])
        except Exception as error:  # the user's code: any failure is theirs to see, before training
            raise DistillError(f"the reward `{spec}` failed on two training rows: {error!r}", field="regime.reward",
                               fix="it takes (prompts, completions), lists of strings, and returns a float each")
        try:
            ok = len(scores) == len(probe) and all(isinstance(float(x), float) for x in scores)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DistillError(f"the reward `{spec}` returned {scores!r} for {len(probe)} rows", field="regime.reward",
                               fix="return one float per completion, in order")
    return reward_fn


def prepare(recipe: LMRecipe, run_dir: RunDirectory) -> "LMJob":
    """Tokenizers, data, teacher and student loaded; every check that can fail done. Nothing written."""
    quiet_transformers()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    # Tokenizers and data before any model loads: the cheap checks fail first.
    setup = LMSetup(recipe)
    student_tokenizer = (load_tokenizer(recipe.student.path, "student.path", recipe.student.trust_remote_code)
                         if recipe.student.path else setup.tokenizer)
    if student_tokenizer.get_vocab() != setup.tokenizer.get_vocab() and not setup.cross:
        check_same_vocabulary(setup.tokenizer, student_tokenizer, None, None)
    check_precision(recipe.train.precision, setup.accelerator.device)
    if recipe.train.sharding == "fsdp" and not sharded_run(recipe, setup.accelerator):
        warnings.warn("train.sharding: fsdp with one process: nothing to shard across, so the run is unsharded "
                      "(launch with `accelerate launch --multi_gpu --num_processes N` or torchrun to shard)")
    job = LMJob(recipe, setup)
    student = job.new_student()
    if setup.cross:  # each model against its own tokenizer
        if setup.teacher is not None:
            check_same_vocabulary(setup.teacher_tokenizer, setup.teacher_tokenizer, setup.teacher, setup.teacher)
        setup.vocab_size = check_same_vocabulary(student_tokenizer, student_tokenizer, student, student)
    else:
        setup.vocab_size = check_same_vocabulary(setup.tokenizer, student_tokenizer, setup.teacher or student, student)
    longest = max(len(e.input_ids) for e in setup.train_examples + setup.eval_examples
                  + rejected_examples(setup.train_examples))
    for role, model in (("teacher", setup.teacher), ("student", student)):
        limit = getattr(model.config, "max_position_embeddings", None) if model is not None else None
        if limit is not None and longest > limit:
            raise DistillError(f"examples reach {longest} tokens but the {role} handles {limit} positions",
                               field="data.max_length", fix=f"set data.max_length <= {limit}")
    if recipe.data.packing:
        check_packing({"teacher": setup.teacher, "student": student})
    kind = recipe.regime.kind
    job.student = student
    adpa = kind == "preference" and recipe.objective.loss == "adpa"
    job.sampling = sampling_settings(recipe, setup, [setup.teacher, student]) if kind in (
        "on_policy", "opd", "sequence", "self") or adpa else None
    if adpa:  # the aligned teacher's own reference, loaded and checked before anything is written
        job.teacher_reference = _reference_model(recipe.regime.preference.teacher_reference,
                                                 "regime.preference.teacher_reference", recipe, setup)
    job.teacher_prompts = privileged_prompts(recipe, setup) if kind == "self" else None
    job.reward_fn = resolve_reward(recipe, setup) if kind == "opd" else None
    if kind == "opd" and recipe.regime.opd.reference is not None:  # G-OPD's reference, checked before any write
        job.opd_reference = _reference_model(recipe.regime.opd.reference, "regime.opd.reference", recipe, setup)
    return job


def _reference_model(path: str, field: str, recipe: LMRecipe, setup: "LMSetup") -> torch.nn.Module:
    """A frozen causal LM over the student's vocabulary (a reference of a reward or an advantage)."""
    reference = load_causal_lm(path, field, trust_remote_code=recipe.teacher.trust_remote_code)
    rows = reference.get_output_embeddings().weight.shape[0]
    if rows < setup.vocab_size:
        raise DistillError(f"the model at `{path}` has {rows} output rows, fewer than the {setup.vocab_size} tokens "
                           "of the student's vocabulary", field=field,
                           fix="give a model of the student's tokenizer (e.g. the teacher's base or SFT model)")
    return reference.eval().requires_grad_(False)


class LMJob(Job):
    """A prepared causal-LM run (see the module docstring)."""

    def __init__(self, recipe: LMRecipe, setup: LMSetup):
        self.recipe, self.setup = recipe, setup
        self.accelerator = setup.accelerator
        self.is_main = self.accelerator.is_main_process
        self.student = self.sampling = self.teacher_prompts = self.reward_fn = self.opd_reference = None
        self.teacher_reference = None
        self.sharded = sharded_run(recipe, self.accelerator)
        self.started = time.perf_counter()

    def new_student(self):
        """A fresh student: loaded from `student.path`, or built from the teacher's config (seeded); with
        `student.lora`, wrapped with fresh adapters (seeded)."""
        recipe, teacher, spec = self.recipe, self.setup.teacher, self.recipe.student
        dtype = DTYPES[spec.dtype]
        if spec.path:
            torch.manual_seed(recipe.train.seed)
            student = None
            if self.sharded and recipe.regime.kind not in ("self", "opd"):  # each process reads its own rows only
                # (self / opd copy the initial student as a teacher / reference: from a whole model)
                student = load_sharded(spec.path, "student.path", dtype, spec.trust_remote_code, trainable=True,
                                       mixed_precision=fsdp_param_dtype(recipe.train))
            if student is None:
                student = load_causal_lm(spec.path, "student.path", dtype, spec.trust_remote_code)
        else:
            source, trust = teacher, recipe.teacher.trust_remote_code
            if source is None:  # from a cache: the teacher's config builds the student; its layers only if copied
                layers = spec.init_from_teacher_layers
                source = (load_causal_lm(recipe.teacher.path, "teacher.path", trust_remote_code=trust)
                          if layers is not None
                          else SimpleNamespace(config=load_config(recipe.teacher.path, "teacher.path", trust)))
            student = build_student(source, spec.config, spec.init_from_teacher_layers, recipe.train.seed, dtype)
        return apply_lora(student, spec.lora, recipe.train.seed) if spec.lora is not None else student

    def reference_student(self):
        """The same-tokenizer reference: the teacher's config (its vocabulary) at the cross student's sizes, seeded."""
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "head_dim")
        teacher_config, student_config = self.setup.teacher.config, transformers_model(self.student).config
        overrides = {key: getattr(student_config, key) for key in sizes
                     if hasattr(teacher_config, key) and getattr(student_config, key, None) is not None}
        return build_student(self.setup.teacher, overrides, None, self.recipe.train.seed, DTYPES["float32"])

    def objective(self, spec=None) -> TokenObjective:
        return TokenObjective(spec, vocab_size=self.setup.vocab_size,
                              memory_budget_bytes=int(self.recipe.train.loss_memory_mb * 2**20))

    def distill_regime(self, run_dir: RunDirectory):
        """The distilled row's regime, and the examples it trains on."""
        recipe, setup, device = self.recipe, self.setup, self.accelerator.device
        regime, kind, examples = recipe.regime, recipe.regime.kind, setup.train_examples
        if setup.cross:
            return self.cross_regime(run_dir)
        if kind == "preference":  # (before the token objective, which a preference loss is not)
            return preference_regime(recipe, self.student, setup.teacher, device, self.accelerator.num_processes,
                                     sampling=self.sampling, teacher_reference=self.teacher_reference), examples
        objective = self.objective(recipe.objective)
        if setup.cache is not None:
            teacher = CachedTeacher(setup.cache, setup.train_spans, regime.sparse)
        else:
            teacher = setup.served or LiveTeacher(setup.teacher)
        if kind == "on_policy":
            return OnPolicy(objective, teacher, self.sampling), examples
        if kind == "self":
            snapshot, lora = None, recipe.student.lora is not None
            if regime.teacher_weights == "snapshot" and not lora:  # the initial student, frozen
                snapshot = copy.deepcopy(self.student).eval().requires_grad_(False).to(device)
            # With LoRA the initial student is the base model with its adapters disabled: no second copy.
            return SelfDistill(objective, self.sampling, self.teacher_prompts, snapshot,
                               base_teacher=lora and regime.teacher_weights == "snapshot"), examples
        if kind == "opd":
            reference = None
            if self.opd_reference is not None:  # G-OPD's reward correction: e.g. the teacher's own base model
                reference = self.opd_reference.to(device)
            elif regime.scale != 1.0:  # the initial student, frozen (at scale 1 it cancels out); with LoRA, the
                # base model with adapters disabled
                reference = ("base" if recipe.student.lora is not None
                             else copy.deepcopy(self.student).eval().requires_grad_(False).to(device))
            tokenizer = setup.tokenizer
            teacher = setup.served or setup.teacher
            if setup.cache is not None:  # offline OPD: the teacher's log-probs of the rollouts, from its cache
                teacher = CachedTeacher(setup.cache, setup.train_spans, regime.sparse)
            return OPD(objective, teacher, self.sampling, scale=regime.scale, reference=reference,
                       reward_fn=self.reward_fn, reward_weight=regime.reward_weight, group_size=regime.group_size,
                       decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                       options=regime.opd, rollouts=setup.behavior), setup.rollout_examples or examples
        if kind == "sequence":  # the teacher's completions, generated once (resumable)
            filtering = regime.rsd_threshold > 0
            if filtering:
                self.student.to(device)  # it filters the teacher's proposals
            examples = teacher_sequences(setup.served or setup.teacher, examples, self.sampling, run_dir.path,
                                         accelerator=self.accelerator, pad_token_id=setup.pad_token_id,
                                         vocab_size=setup.vocab_size, seed=recipe.data.seed,
                                         batch_size=recipe.eval.batch_size, student=self.student if filtering else None)
        return Distill(objective, teacher), examples

    def cross_regime(self, run_dir: RunDirectory):
        """The distilled row's regime when teacher and student tokenize differently (distill/lm/cross_tokenizer/)."""
        recipe, setup = self.recipe, self.setup
        matched = (matched_vocabulary(setup.tokenizer, setup.teacher_tokenizer)
                   if recipe.objective.loss == "gold_hybrid" or recipe.objective.overlap_loss else None)
        params = recipe.objective.loss_params()
        boundaries = ((boundary_mask(setup.tokenizer), boundary_mask(setup.teacher_tokenizer))
                      if params.get("debias") or params.get("merge_threshold", 0) > 0 else None)
        objective = CrossObjective(recipe.objective, student_vocab=setup.vocab_size,
                                   teacher_vocab=len(setup.teacher_tokenizer), matched=matched, boundaries=boundaries)
        pads = dict(student_pad=setup.pad_token_id, teacher_pad=setup.teacher_tokenizer.pad_token_id or 0)
        pairs = setup.train_pairs
        if setup.cache is not None:  # the teacher's cached log-probabilities of its tokens (and top-k)
            return CrossDistill(objective, CachedTokenLogprobs(setup.cache, setup.train_spans), pairs,
                                **pads), setup.train_examples
        teacher = setup.served or setup.teacher  # (served: its answers for the teacher's tokens of each row)
        if recipe.regime.kind == "on_policy":
            return CrossOnPolicy(objective, teacher, pairs, records=setup.train_records, sampling=self.sampling,
                                 student_tokenizer=setup.tokenizer, teacher_tokenizer=setup.teacher_tokenizer,
                                 max_length=recipe.data.max_length, **pads), setup.train_examples
        if recipe.regime.kind == "sequence":  # the teacher completes its own prompts once (resumable), as text
            teacher_eos = setup.teacher_tokenizer.eos_token_id if self.sampling.eos_token_id is not None else None
            sampling = dataclasses.replace(self.sampling, eos_token_id=teacher_eos)
            generated = teacher_sequences(setup.teacher, [pair.teacher for pair in pairs], sampling, run_dir.path,
                                          accelerator=self.accelerator, pad_token_id=pads["teacher_pad"],
                                          vocab_size=len(setup.teacher_tokenizer), seed=recipe.data.seed,
                                          batch_size=recipe.eval.batch_size)
            pairs = teacher_text_pairs(pairs, setup.train_records, generated, setup.teacher_tokenizer, setup.tokenizer,
                                       max_length=recipe.data.max_length, eos_token_id=teacher_eos)
            return CrossDistill(objective, setup.teacher, pairs, **pads), [pair.student for pair in pairs]
        return CrossDistill(objective, teacher, pairs, **pads), setup.train_examples

    def run(self, run_dir: RunDirectory) -> RunResult:
        recipe, setup, accelerator = self.recipe, self.setup, self.accelerator
        from accelerate.utils import gather_object

        if setup.teacher is not None:
            setup.teacher.to(accelerator.device)
        phases = [("distilled", *self.distill_regime(run_dir))]
        if recipe.train.baseline:
            phases.append(("alone", Distill(self.objective()), setup.train_examples))
        if recipe.train.same_tokenizer_reference:  # a student of the same size on the teacher's tokenizer
            objective = TokenObjective(ObjectiveSpec(loss="forward_kl"), vocab_size=len(setup.teacher_tokenizer),
                                       memory_budget_bytes=int(recipe.train.loss_memory_mb * 2**20))
            phases.append(("same_tokenizer", Distill(objective, LiveTeacher(setup.teacher)),
                           [pair.teacher for pair in setup.train_pairs]))
        if self.sharded and setup.teacher is not None and not is_sharded(setup.teacher):  # frozen: no gradients,
            shard_causal_lm(setup.teacher, trainable=False, mixed_precision=None)        # no optimizer state
        teacher_reads = (setup.teacher,) if self.sharded and setup.teacher is not None else ()
        rows, weight_hashes, privacy = {}, {}, {}
        shares = {"teacher": gather_object([local_share(setup.teacher)])} if teacher_reads else {}
        for row, regime, examples in phases:
            model_dir = run_dir.path / ROW_DIRS[row]
            if run_dir.resume and (model_dir / "config.json").is_file():
                model = load_causal_lm(str(model_dir), "output")  # this phase finished before the interruption
                if recipe.train.privacy is not None:
                    from distill.core.privacy import spent

                    privacy[row] = spent(recipe.train.privacy, num_examples=len(examples),
                                         batch_size=recipe.train.batch_size, steps=recipe.train.steps)
            else:
                reference = row == "same_tokenizer"  # the teacher's tokenizer, vocabulary and evaluation
                model = (self.student if row == "distilled" else self.reference_student() if reference
                         else self.new_student())
                trainer = LMTrainer(accelerator=accelerator, student=model, regime=regime, phase=row, examples=examples,
                                    pad_token_id=(setup.teacher_tokenizer.pad_token_id or 0) if reference
                                    else setup.pad_token_id,
                                    vocab_size=len(setup.teacher_tokenizer) if reference else setup.vocab_size,
                                    spec=recipe.train, eval_every=recipe.eval.every,
                                    evaluate=setup.evaluate_on_teacher_tokens if reference else setup.evaluate,
                                    run_dir=run_dir, eval_reads=teacher_reads,
                                    weights=setup.train_weights if row in ("distilled", "alone") else None)
                trainer.fit(resume=run_dir.resume)
                if trainer.privacy is not None:
                    privacy[row] = trainer.privacy
                model = trainer.model
                full = None
                if trainer.sharded:  # the full weights, gathered on the main process, which saves them
                    shares[row] = gather_object([local_share(model)])
                    full = gather_full_state(model)
                else:  # every process holds the whole model: the same on every one (recorded)
                    weight_hashes[row] = gather_object([weights_sha256(model)])
                if self.is_main:  # a LoRA student: its adapter, and the merged model from here on
                    model = save_model(model, setup.teacher_tokenizer if row == "same_tokenizer" else setup.tokenizer,
                                       model_dir, state_dict=full)
                accelerator.wait_for_everyone()
            with gathered_all((model, *teacher_reads)):  # sharded: every process gathers, the main evaluates
                if self.is_main:
                    evaluate = setup.evaluate_on_teacher_tokens if row == "same_tokenizer" else setup.evaluate
                    rows[row] = evaluate(on_device(model, accelerator.device).eval(), final=True, row=row)
        with gathered_all(teacher_reads):
            teacher_row = setup.teacher_row() if self.is_main else None
        if not self.is_main:
            return RunResult(run_dir.path, {}, {})
        rows = {"teacher": teacher_row, **{row: rows[row] for row in ("same_tokenizer", "alone", "distilled")
                                           if row in rows}}
        meta = {**setup.meta(rows), "world_size": accelerator.num_processes, "weight_sha256_per_rank": weight_hashes,
                **({"privacy": privacy} if privacy else {}),
                "sharding": "fsdp" if self.sharded else ("ddp" if accelerator.num_processes > 1 else "none"),
                **({"parameter_share_per_rank": shares, "teacher_loaded_sharded": setup.teacher_loaded_sharded}
                   if shares else {}),
                **({"served_teacher": setup.served.statistics()} if setup.served is not None else {}),
                "seconds": time.perf_counter() - self.started}
        if privacy:
            from distill.core.privacy import privacy_note

            meta["notes"] = [*meta.get("notes", []), *(privacy_note(row, summary) for row, summary in privacy.items())]
            for row, summary in privacy.items():
                rows[row]["epsilon"] = summary["epsilon"]
        return RunResult(run_dir.path, rows, meta)

    def figures(self, plots_dir) -> list:
        """Per-token histograms of the final evaluations: the NLL of the eval tokens under the teacher, alone and
        distilled, and each student's KL to the teacher (where a student loses the teacher)."""
        from distill.core.report import plot_histograms

        values = {row: self.setup.token_values[row] for row in ("teacher", "alone", "distilled")
                  if row in self.setup.token_values}
        nll_title, kl_title = "per-token NLL of the eval data (nats)", "per-token KL(teacher || model) (nats)"
        panels = {nll_title: {row: v["nll"].tolist() for row, v in values.items()},
                  kl_title: {row: v["kl"].tolist() for row, v in values.items() if row != "teacher" and "kl" in v}}
        plot = plot_histograms(panels, plots_dir / "token_kl.png", log_x=(kl_title,), log_y=(nll_title,))
        return [plot] if plot is not None else []

    def close(self) -> None:
        if self.setup.served is not None:
            self.setup.served.close()
        self.accelerator.wait_for_everyone()
