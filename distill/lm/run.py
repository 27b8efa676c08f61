"""`distill.run()`: recipe -> models, data, teacher signal, trainer, evaluation, report.
(The module is `pipeline`, not `run`, so that `distill.run` stays the function.)

Three rows on the same eval data end every run: the teacher, the student trained alone (same
init, data order and steps, hard labels) and the distilled student.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import shutil
import time
import warnings
from pathlib import Path

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from transformers import AutoConfig
from accelerate.utils import gather_object

from distill.lm.data import read_records, tokenize
from distill.core.errors import DistillError
from distill.lm.evaluate import evaluate_model
from distill.lm.models import (DTYPES, build_student, check_same_vocabulary, load_causal_lm, load_tokenizer,
                            quiet_transformers, resolve_model_path)
from distill.lm.recipe import Recipe, load_recipe
from distill.core.report import ROW_NAMES, write_report
from distill.core.rundir import RunResult, prepare_output_dir
from distill.lm.tasks import get_task
from distill.lm.tasks.completions import CompletionsScorer
from distill.lm.teacher.sequences import teacher_sequences
from distill.lm.trainer import LMTrainer, Phase
from distill.lm.regimes import OPD, OnPolicy, SelfDistill, prompt_of

def make_accelerator() -> Accelerator:
    # Without a GPU, plain Accelerator() under `accelerate launch --multi_gpu` gives independent
    # world-size-1 processes (measured); cpu=True joins them into one gloo process group.
    return Accelerator(cpu=not torch.cuda.is_available())


def load_data(recipe: Recipe, tokenizer, task):
    """(train_records, eval_records, train_examples, eval_examples) for a built-in task or files."""
    spec = recipe.data
    if task is not None:
        train_records = task.records(spec.train_size, spec.seed, "train")
        eval_records = task.records(spec.eval_size, spec.seed, "eval")
        append_eos = task.append_eos
    else:
        train_records = read_records(spec.train, "data.train")
        if spec.eval is not None:
            eval_records = read_records(spec.eval, "data.eval")
        else:
            if len(train_records) <= spec.eval_size:
                raise DistillError(f"{len(train_records)} rows cannot spare eval_size={spec.eval_size} for eval",
                                   field="data.eval_size", fix="give data.eval, or lower data.eval_size")
            train_records, eval_records = train_records[:-spec.eval_size], train_records[-spec.eval_size:]
        append_eos = True
    options = dict(max_length=spec.max_length, too_long=spec.too_long, completion_only=spec.completion_only,
                   append_eos=append_eos)
    return (train_records, eval_records, tokenize(train_records, tokenizer, field="data.train", **options),
            tokenize(eval_records, tokenizer, field="data.eval", **options))


def on_policy_settings(recipe: Recipe, train_examples, task, tokenizer, models) -> OnPolicy:
    """Sampling settings of on_policy / sequence, checked before training: prompts exist, completions
    fit the context."""
    regime = recipe.regime
    prompts = [prompt_of(e) for e in train_examples]
    if task is None and all(len(p) <= 1 for p in prompts):  # built-in tasks may sample from BOS on purpose
        raise DistillError(f"regime {regime.kind} samples completions for the data's prompts, and these rows have "
                           "none (`text` rows)", field="data.train",
                           fix="use prompt/completion or chat `messages` rows, or regime.kind: off_policy")
    completions = [len(e.input_ids) - len(p) for e, p in zip(train_examples, prompts)]
    max_new_tokens = regime.max_new_tokens or max(completions)
    longest = max(map(len, prompts)) + max_new_tokens
    for model in models:
        limit = getattr(model.config, "max_position_embeddings", None) if model is not None else None
        if limit is not None and longest > limit:
            raise DistillError(f"a prompt of {max(map(len, prompts))} tokens + max_new_tokens={max_new_tokens} "
                               f"reaches {longest} positions, over the model's {limit}", field="regime.max_new_tokens",
                               fix=f"set regime.max_new_tokens <= {limit - max(map(len, prompts))}")
    eos = tokenizer.eos_token_id if (task is None or task.append_eos) else None
    return OnPolicy(lmbda=regime.lmbda, max_new_tokens=max_new_tokens, temperature=regime.sample_temperature,
                    top_p=regime.top_p, eos_token_id=eos, filter_threshold=regime.rsd_threshold)


def privileged_prompts(recipe: Recipe, records: list[dict], examples, tokenizer) -> dict[str, list[int]]:
    """Example id -> tokens of the teacher's prompt (privileged context + prompt), for regime self."""
    regime = recipe.regime
    prompts = {}
    for index, (record, example) in enumerate(zip(records, examples)):
        if not isinstance(record, dict) or "prompt" not in record or regime.privileged_field not in record:
            missing = "prompt" if not isinstance(record, dict) or "prompt" not in record else regime.privileged_field
            raise DistillError(f"regime self: training row {index} has no `{missing}` field", field=(
                "regime.privileged_field" if missing != "prompt" else "data.train"),
                fix="give prompt/completion rows with the privileged field (e.g. a reference solution)")
        text = regime.privileged_template.format(privileged=record[regime.privileged_field], prompt=record["prompt"])
        prompts[example.id] = tokenizer(text).input_ids
    return prompts


def resolve_reward(recipe: Recipe, task, train_records: list[dict]):
    """The opd sequence reward function, imported and probed on two training rows before training."""
    spec = recipe.regime.reward
    if spec is None:
        return None
    if spec == "builtin":
        reward_fn = getattr(task, "reward", None)
        if reward_fn is None:
            raise DistillError("`builtin` names the task's own reward, and this data has none", field="regime.reward",
                               fix="use data.builtin: arithmetic, or give `module:function`")
    else:
        module_name, _, function_name = spec.partition(":")
        try:
            reward_fn = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise DistillError(f"cannot import the reward `{spec}`: {error}", field="regime.reward",
                               fix="give `package.module:function`, importable from the current directory") from None
    probe = [r for r in train_records[:2] if isinstance(r, dict) and "prompt" in r and "completion" in r]
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


def open_cache(recipe: Recipe, tokenizer, train_examples) -> tuple["TeacherCache", list[tuple[int, int]]]:
    """The recipe's teacher cache, checked against this run's teacher, tokenizer and data, and the
    cache rows (offset, count) of every training example."""
    from distill.lm.teacher.cache.store import TeacherCache, identity_differences, teacher_identity, tokenizer_sha256

    regime = recipe.regime
    cache = TeacherCache(regime.path, k=regime.k if "k" in regime.model_fields_set else None)
    built = cache.manifest["identity"]
    current = {"tokenizer_sha256": tokenizer_sha256(tokenizer),
               "teacher": teacher_identity(resolve_model_path(recipe.teacher.path, "teacher.path"))}
    differences = identity_differences({k: built[k] for k in current}, current)
    if differences:
        raise DistillError(f"the cache at `{regime.path}` was built with another {', '.join(differences)} than "
                           "this recipe's", field="regime.path",
                           fix="rebuild it with `distill cache <recipe>` into a new directory, or point "
                               "teacher.path at the teacher it was built with")
    # Every training example is cached, with the same tokens: checked now, before any model loads.
    return cache, cache.rows_for("train", train_examples)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(recipe: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
        overwrite: bool = False) -> RunResult:
    """Distill the recipe's teacher into its student; write the run directory; return the rows."""
    recipe = load_recipe(recipe, overrides)
    if recipe.task == "classifier":
        from distill.classifier.run import run_classifier

        return run_classifier(recipe, resume=resume, overwrite=overwrite)
    started = time.perf_counter()
    quiet_transformers()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = make_accelerator()
    is_main = accelerator.is_main_process
    run_dir = recipe.output_dir
    prepare_output_dir(run_dir, resume=resume, overwrite=overwrite, is_main=is_main)
    accelerator.wait_for_everyone()

    # Tokenizers and data before any model loads: the cheap checks fail first.
    task = get_task(recipe.data.builtin) if recipe.data.builtin else None
    tokenizer = load_tokenizer(recipe.teacher.path, "teacher.path")
    student_tokenizer = load_tokenizer(recipe.student.path, "student.path") if recipe.student.path else tokenizer
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        check_same_vocabulary(tokenizer, student_tokenizer, None, None)
    train_records, eval_records, train_examples, eval_examples = load_data(recipe, tokenizer, task)
    # What scores a model beyond nll: the built-in task, or greedy exact match on prompt/completion files.
    scorer = task or CompletionsScorer.for_records(eval_records, tokenizer)

    cache, train_spans = (open_cache(recipe, tokenizer, train_examples) if recipe.regime.kind == "cache"
                          else (None, None))
    if cache is None:
        teacher = load_causal_lm(recipe.teacher.path, "teacher.path", DTYPES[recipe.teacher.dtype]).eval()
        teacher.requires_grad_(False)
    else:  # no teacher in memory: its config builds the student; its layers only if asked to copy them
        teacher = None

    def new_student():
        if recipe.student.path:
            torch.manual_seed(recipe.train.seed)
            return load_causal_lm(recipe.student.path, "student.path")
        source = teacher
        if source is None:
            layers = recipe.student.init_from_teacher_layers
            source = (load_causal_lm(recipe.teacher.path, "teacher.path") if layers is not None
                      else SimpleNamespace(config=AutoConfig.from_pretrained(resolve_model_path(
                          recipe.teacher.path, "teacher.path"))))
        return build_student(source, recipe.student.config, recipe.student.init_from_teacher_layers, recipe.train.seed)

    student = new_student()
    vocab_size = check_same_vocabulary(tokenizer, student_tokenizer, teacher or student, student)
    longest = max(len(e.input_ids) for e in train_examples + eval_examples)
    for role, model in (("teacher", teacher), ("student", student)):
        limit = getattr(model.config, "max_position_embeddings", None) if model is not None else None
        if limit is not None and longest > limit:
            raise DistillError(f"examples reach {longest} tokens but the {role} handles {limit} positions",
                               field="data.max_length", fix=f"set data.max_length <= {limit}")
    sampling = (on_policy_settings(recipe, train_examples, task, tokenizer, [teacher, student])
                if recipe.regime.kind in ("on_policy", "opd", "sequence", "self") else None)
    teacher_prompts = privileged_prompts(recipe, train_records, train_examples, tokenizer) \
        if recipe.regime.kind == "self" else None
    reward_fn = resolve_reward(recipe, task, train_records) if recipe.regime.kind == "opd" else None

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (run_dir / "recipe.yaml").is_file():
            _warn_changed_fields(load_recipe(run_dir / "recipe.yaml"), recipe)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    accelerator.wait_for_everyone()
    if teacher is not None:
        teacher.to(accelerator.device)

    eval_cache = (cache, cache.rows_for("eval", eval_examples, field="data.eval")) if cache is not None else None

    def evaluate(model, final: bool = False) -> dict:
        return evaluate_model(model, task=scorer, tokenizer=tokenizer, eval_records=eval_records,
                              eval_examples=eval_examples, vocab_size=vocab_size,
                              batch_size=recipe.eval.batch_size, generate_size=recipe.eval.generate_size,
                              seed=recipe.data.seed, teacher=teacher, teacher_cache=eval_cache,
                              throughput_tokens=recipe.eval.throughput_tokens if final else None)

    distilled = Phase("distilled", run_dir / "checkpoint", teacher, recipe.objective)
    distilled_examples = train_examples
    if recipe.regime.kind == "on_policy":
        distilled.on_policy = sampling
    elif recipe.regime.kind == "self":
        snapshot = None
        if recipe.regime.teacher_weights == "snapshot":  # the initial student, frozen
            snapshot = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)
        distilled.self_distill = SelfDistill(sampling=sampling, teacher_prompts=teacher_prompts, snapshot=snapshot)
    elif recipe.regime.kind == "opd":
        regime = recipe.regime
        reference = None
        if regime.scale != 1.0:  # the initial student, frozen (at scale 1 it cancels out)
            reference = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)
        distilled.opd = OPD(sampling=sampling, scale=regime.scale, reference=reference, reward_fn=reward_fn,
                            reward_weight=regime.reward_weight, group_size=regime.group_size,
                            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    elif recipe.regime.kind == "sequence":  # the teacher's completions, generated once (resumable)
        if recipe.regime.rsd_threshold > 0:
            student.to(accelerator.device)  # it filters the teacher's proposals
        distilled_examples = teacher_sequences(teacher, train_examples, sampling, run_dir, accelerator=accelerator,
                                               pad_token_id=tokenizer.pad_token_id or 0, vocab_size=vocab_size,
                                               seed=recipe.data.seed, batch_size=recipe.eval.batch_size,
                                               student=student if recipe.regime.rsd_threshold > 0 else None)
    if cache is not None:
        distilled.cache, distilled.sparse = cache, recipe.regime.sparse
        distilled.cache_spans = train_spans
    phases = [("distilled", "student", distilled)]
    if recipe.train.baseline:
        phases.append(("alone", "alone", Phase("alone", run_dir / "checkpoint-alone")))
    rows, weight_hashes = {}, {}
    for row, model_dir_name, phase in phases:
        model_dir = run_dir / model_dir_name
        model = student if row == "distilled" else new_student()
        if resume and (model_dir / "config.json").is_file():
            model = load_causal_lm(str(model_dir), "output")  # this phase finished before the interruption
        else:
            trainer = LMTrainer(accelerator=accelerator, student=model, phase=phase,
                                examples=distilled_examples if row == "distilled" else train_examples,
                                pad_token_id=tokenizer.pad_token_id or 0, vocab_size=vocab_size, spec=recipe.train,
                                eval_every=recipe.eval.every, evaluate=evaluate,
                                metrics_file=run_dir / "metrics.jsonl", losses_file=run_dir / "losses.jsonl")
            trainer.fit(resume=resume)
            model = trainer.model
            weight_hashes[row] = gather_object([weights_sha256(model)])
            if is_main:
                _save_model_atomically(model, tokenizer, model_dir)
            accelerator.wait_for_everyone()
        if is_main:
            rows[row] = evaluate(model.to(accelerator.device).eval(), final=True)
    if is_main:
        # From a cache, the teacher row is the evaluation made when the cache was built.
        teacher_row = evaluate(teacher, final=True) if teacher is not None else dict(cache.manifest["teacher_eval"])
        rows = {"teacher": teacher_row, **rows}
        extras = {"world_size": accelerator.num_processes, "weight_sha256_per_rank": weight_hashes,
                  "seconds": time.perf_counter() - started, "recipe": recipe.model_dump(mode="json")}
        result = RunResult(run_dir, {k: rows[k] for k in ROW_NAMES if k in rows},
                           scorer.metric if scorer else "nll", scorer.higher_is_better if scorer else False, extras)
        write_report(result)
    accelerator.wait_for_everyone()
    return result if is_main else None


def _warn_changed_fields(saved: Recipe, current: Recipe) -> None:
    """Resuming with a changed recipe is allowed (e.g. a lower lr after a non-finite loss), but said."""
    def flat(data, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    before, after = dict(flat(saved.model_dump(mode="json"))), dict(flat(current.model_dump(mode="json")))
    changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k)]
    if changed:
        warnings.warn("resuming with a recipe that differs from the saved one: " + "; ".join(changed), stacklevel=2)


def _save_model_atomically(model, tokenizer, directory: Path) -> None:
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)

