"""`distill cache recipe.yaml`: run the teacher once over the recipe's data and store, for every
completion token, its top-k token ids, their log-probabilities and the log of the remaining
mass. Resumable (finished shards are kept and skipped), verifiable (per-shard sha256), and
sharded across processes under `accelerate launch` / `torchrun`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill.core.errors import DistillError, note_output_directory
from distill.core.io import atomic_write_json, writable_problem
from distill.core.recipe import load_recipe
from distill.lm.data import IGNORE_INDEX, check_packing, collate, load_data, model_inputs
from distill.lm.evaluate import evaluate_model
from distill.lm.models import DTYPES, load_causal_lm, load_tokenizer, make_accelerator, quiet_transformers
from distill.lm.recipe import LMRecipe
from distill.lm.tasks import get_task
from distill.lm.tasks.completions import CompletionsScorer
from distill.lm.teacher.cache.codec import encode_topk
from distill.lm.teacher.cache.store import (FORMAT, FORMAT_VERSION, MANIFEST, dataset_fingerprint, example_hash,
                                            identity_differences, read_manifest, recipe_teacher_identity,
                                            shard_path, tokenizer_sha256, write_shard)
from distill.lm.teacher.served import ServedTeacher, connect, served_row

# Testing aid: stop as if killed after this many shards were written (tests/test_cache.py).
STOP_AFTER_SHARDS_ENV = "DISTILL_CACHE_STOP_AFTER_SHARDS"


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [..., k], log-probs [..., k] sorted descending, log tail mass [...]) of logits [..., V].

    The tail is a logsumexp over the entries outside the top-k (not log(1 - sum top-k), which
    loses all digits when the top-k holds nearly everything)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    tail = logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.indices, top.values, tail


def _plan(examples: dict[str, list], shard_examples: int) -> list[tuple[str, int, int]]:
    """(split, start, end) of every shard: consecutive examples, the train split first."""
    return [(split, start, min(start + shard_examples, len(rows)))
            for split, rows in examples.items() for start in range(0, len(rows), shard_examples)]


def build_cache(recipe: str | Path | dict | LMRecipe, overrides: tuple[str, ...] = (), *, out: str | None = None,
                k: int | None = None, ids: str | None = None, values: str | None = None,
                shard_examples: int | None = None) -> Path:
    """Build (or finish) the cache of the recipe's teacher on its train and eval data; return its directory."""
    recipe = load_recipe(recipe, overrides)
    if recipe.task != "lm":
        raise DistillError(f"a teacher cache holds a causal LM's top-k; this recipe is `task: {recipe.task}`",
                           field="task", fix="give a causal-LM recipe (task: lm)")
    regime = recipe.regime
    offline = regime.kind == "opd" and regime.rollouts is not None  # the teacher scores stored rollouts
    if out is None and not (regime.kind == "cache" or (offline and regime.path)):
        raise DistillError("no cache directory given", field="regime.path",
                           fix="pass --out DIR, or set regime: {kind: cache, path: DIR} in the recipe (offline OPD: "
                               "regime.path beside regime.rollouts)")
    directory = Path(out or regime.path).expanduser()
    options = {"k": k or regime.k, "ids": ids or regime.ids, "values": values or regime.values,
               "shard_examples": shard_examples or regime.shard_examples}
    quiet_transformers()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes

    task = get_task(recipe.data.builtin) if recipe.data.builtin else None
    spec = recipe.teacher
    # A served teacher's tokenizer: a local copy (teacher.path, no weights needed), or else the student's.
    source, source_field = ((spec.path, "teacher.path") if spec.path is not None or not spec.served
                            else (recipe.student.path, "student.path"))
    tokenizer = load_tokenizer(source, source_field, spec.trust_remote_code)
    train_records, eval_records, train_examples, eval_examples = load_data(recipe.data, tokenizer, task)
    if offline:  # the student's stored samples, in place of the data's completions
        from distill.lm.rollouts import check_teacher_consistency, load_rollouts

        train_examples, _, rollouts = load_rollouts(regime.rollouts, train_examples)
        check_teacher_consistency(rollouts.get("sft_teacher"), recipe, "distill cache")
    examples = {"train": train_examples, "eval": eval_examples}
    for split, rows in examples.items():
        seen = set()
        for example in rows:
            if example.id in seen:
                raise DistillError(f"two {split} rows share the id `{example.id}`", field=f"data.{split}",
                                   fix="give every row a unique `id`, or drop the `id` column (row numbers are used)")
            seen.add(example.id)
    vocab_size = len(tokenizer)
    if k is None and "k" not in regime.model_fields_set:  # the default 64, or the whole of a smaller vocabulary
        options["k"] = min(options["k"], vocab_size)
    if not 1 <= options["k"] <= vocab_size:
        raise DistillError(f"k={options['k']} is outside 1..{vocab_size} (the vocabulary)", field="regime.k",
                           fix="choose k between 1 and the vocabulary size (64 is a good default)")
    identity = {
        "teacher": recipe_teacher_identity(spec), "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size, "k": options["k"], "ids": options["ids"], "values": options["values"],
        "shard_examples": options["shard_examples"],
        "datasets": {split: dataset_fingerprint([e.id for e in rows], [example_hash(e.input_ids, e.labels)
                                                                       for e in rows])
                     for split, rows in examples.items()},
    }
    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory, field="regime.path")
        differences = identity_differences(manifest["identity"], identity)
        if differences:
            raise DistillError(f"`{directory}` holds a finished cache built with other {', '.join(differences)}",
                               field="regime.path", fix="choose another directory (nothing was changed)")
        if accelerator.is_main_process:
            print(f"cache at {directory} is complete ({manifest['num_tokens']:,} tokens); nothing to do")
        return directory

    problem = writable_problem(directory)
    if problem is not None:
        raise DistillError(f"the cache directory `{directory}` cannot be written: {problem}", field="regime.path",
                           fix="choose a writable directory (--out DIR)")
    # A served teacher is checked (it answers, with this tokenizer) before anything is written.
    served = ServedTeacher(connect(spec, tokenizer), options["k"], vocab_size) if spec.served else None
    directory.mkdir(parents=True, exist_ok=True)
    note_output_directory(directory)  # a failure's traceback goes to <cache>/error.log
    finished = _finished_shards(directory, identity)
    plan = _plan(examples, options["shard_examples"])
    mine = [index for index in range(len(plan)) if index % world == rank and index not in finished]
    progress_file = directory / f"progress-rank{rank}.json"
    my_record = {"identity": identity, "shards": {str(i): s for i, s in finished.items() if i % world == rank}}
    accelerator.wait_for_everyone()  # every process has read the progress files before any is rewritten

    teacher = None
    if not spec.served:
        teacher = load_causal_lm(spec.path, "teacher.path", DTYPES[spec.dtype], spec.trust_remote_code).eval()
        teacher.to(accelerator.device)
        if recipe.data.packing:
            check_packing({"teacher": teacher})
    pad = tokenizer.pad_token_id or 0
    batch_size = recipe.eval.batch_size
    total_examples = sum(plan[i][2] - plan[i][1] for i in mine)
    bar = tqdm(total=total_examples, desc=f"caching top-{options['k']}", disable=not accelerator.is_main_process,
               dynamic_ncols=True, unit="ex")
    started, tokens_done, written = time.perf_counter(), 0, 0
    for index in mine:
        split, start, end = plan[index]
        rows = examples[split][start:end]
        top_ids, top_logprobs, tails, counts, targets = [], [], [], [], []
        for batch_start in range(0, len(rows), batch_size):
            batch = collate(rows[batch_start:batch_start + batch_size], pad)
            labels = batch["labels"][:, 1:]
            if served is not None:  # (one round of requests gives both)
                ids_, logprobs_, tail_, target_ = served.answers(batch)
            else:
                with torch.no_grad():
                    logits = teacher(**{k: v.to(accelerator.device) if v is not None else None
                                        for k, v in model_inputs(batch).items()}, use_cache=False).logits
                ids_, logprobs_, tail_ = teacher_topk(logits[:, :-1, :vocab_size], options["k"])
                target_ = torch.log_softmax(logits[:, :-1, :vocab_size].float(), -1).gather(
                    -1, labels.clamp(min=0).to(logits.device)[..., None]).squeeze(-1)
            mask = (labels != IGNORE_INDEX).to(ids_.device)
            targets.append(target_[mask.to(target_.device)].cpu())  # the actual tokens' log-probs (ALM)
            top_ids.append(ids_[mask].cpu())  # row-major: each example's tokens in order
            top_logprobs.append(logprobs_[mask].cpu())
            tails.append(tail_[mask].cpu())
            counts += mask.sum(1).tolist()
            bar.update(min(batch_size, len(rows) - batch_start))
        try:
            arrays = encode_topk(torch.cat(top_ids).numpy(), torch.cat(top_logprobs).numpy(),
                                 torch.cat(tails).numpy(), vocab_size=vocab_size, ids_scheme=options["ids"],
                                 values=options["values"])
        except ValueError as error:  # e.g. -inf log-probs (masked tokens) inside the top-k with int8 values
            raise DistillError(f"cannot store the teacher's top-{options['k']} of {split} examples "
                               f"{start}-{end - 1}: {error}", field="regime.values",
                               fix="use values: float16, or a smaller regime.k") from None
        arrays["tokens"] = torch.tensor(counts, dtype=torch.int32).numpy()
        arrays["token_logprobs"] = torch.cat(targets).float().numpy()
        entry = write_shard(directory / f"{split}-{index:05d}.safetensors", arrays, {
            "example_ids": [e.id for e in rows], "example_hashes": [example_hash(e.input_ids, e.labels) for e in rows]})
        entry.update(split=split, examples=len(rows), tokens=int(sum(counts)))
        my_record["shards"][str(index)] = entry
        atomic_write_json(progress_file, my_record)  # after the shard: a kill leaves it findable
        tokens_done += entry["tokens"]
        written += 1
        if written == int(os.environ.get(STOP_AFTER_SHARDS_ENV, "0")):
            raise SystemExit(f"{STOP_AFTER_SHARDS_ENV}: simulated kill after {tokens_done} tokens")
    bar.close()
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        shards = _finished_shards(directory, identity)
        missing = [plan[i] for i in range(len(plan)) if i not in shards]
        if missing:
            raise DistillError(f"{len(missing)} shards are missing after the build (e.g. {missing[0]})",
                               field="regime.path", fix="run `distill cache` again to finish them")
        ordered = [shards[i] for i in range(len(plan))]
        num_tokens = sum(s["tokens"] for s in ordered)
        num_bytes = sum(s["bytes"] for s in ordered)
        # The report's teacher row: the teacher is evaluated here, once, so training needs it never.
        scorer = task or CompletionsScorer.for_eval(recipe.eval, eval_records, tokenizer)
        if served is not None:
            teacher_eval, _ = served_row(served, scorer=scorer, records=eval_records, examples=eval_examples,
                                         tokenizer=tokenizer, batch_size=recipe.eval.batch_size,
                                         generate_size=recipe.eval.generate_size,
                                         temperature=recipe.eval.sample_temperature, seed=recipe.data.seed)
            served.close()
        else:
            teacher_eval = evaluate_model(teacher, task=scorer, tokenizer=tokenizer, eval_records=eval_records,
                                          eval_examples=eval_examples, vocab_size=vocab_size,
                                          batch_size=recipe.eval.batch_size, generate_size=recipe.eval.generate_size,
                                          seed=recipe.data.seed, teacher=teacher,
                                          throughput_tokens=recipe.eval.throughput_tokens)
        atomic_write_json(directory / MANIFEST, {
            "format": FORMAT, "version": FORMAT_VERSION, "identity": identity, **{k: identity[k] for k in (
                "k", "ids", "values", "vocab_size")}, "token_logprobs": True,
            "num_tokens": num_tokens, "num_bytes": num_bytes, "bytes_per_token": num_bytes / max(num_tokens, 1),
            "examples": {split: len(rows) for split, rows in examples.items()},
            "teacher_eval": teacher_eval, "build_seconds_last_run": seconds, "world_size": world,
            "shards": ordered,
        })
        print(f"cached {num_tokens:,} tokens in {len(ordered)} shards at {directory} "
              f"({num_bytes / max(num_tokens, 1):.1f} bytes/token, top-{options['k']}, "
              f"{options['ids']} ids, {options['values']} values)")
    accelerator.wait_for_everyone()
    return directory


def _finished_shards(directory: Path, identity: dict) -> dict[int, dict]:
    """Shards recorded by any process's progress file whose file exists with the recorded size.
    A progress file from a build with another teacher, tokenizer, data or options is refused."""
    finished = {}
    for progress in sorted(directory.glob("progress-rank*.json")):
        try:
            record = json.loads(progress.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("shards"), dict):
            raise DistillError(f"`{progress}` is not a progress record of a cache build", field="regime.path",
                               fix="remove it to rebuild those shards, or choose another directory")
        differences = identity_differences(record.get("identity", {}), identity)
        if differences:
            raise DistillError(f"`{directory}` holds an unfinished cache built with other {', '.join(differences)}",
                               field="regime.path",
                               fix="finish it with its own recipe, or choose another directory (nothing was changed)")
        for index, shard in record["shards"].items():
            path = shard_path(directory, shard, "regime.path", progress.name)
            if not str(index).isdigit() or not isinstance(shard.get("bytes"), int):
                raise DistillError(f"`{progress}` holds a malformed shard record {index!r}", field="regime.path",
                                   fix="remove it to rebuild those shards, or choose another directory")
            if path.is_file() and path.stat().st_size == shard["bytes"]:
                finished[int(index)] = shard
    return finished
