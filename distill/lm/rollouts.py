"""Offline on-policy distillation (Lightning OPD): the student's samples written once, scored once, trained from.

Lightning OPD (Wu, Han & Cai 2026, arXiv 2604.13010) runs on-policy distillation without a live teacher:

1. `distill rollouts RECIPE` samples the student's completions of the training prompts once (the recipe's
   initial student, usually an SFT checkpoint; `--student PATH` samples another, e.g. a later run's student)
   and stores each sampled token with its log-probability under the sampling policy;
2. `distill cache RECIPE` scores them with the teacher once (the cache keeps log p_T of every stored token);
3. `distill run RECIPE` trains by OPD's policy gradient from those rollouts, the teacher's log-probs read from
   the cache: no sampling and no teacher in memory during training. The rollouts grow stale as the student
   moves; each token's importance ratio p_S / p_rollout is PPO-clipped (`regime.opd.ratio_clip`).

The paper's condition, **teacher consistency**: the teacher that scores the rollouts must be the teacher whose
outputs the student was fine-tuned on; otherwise OPD (offline or online) converges to a biased fixed point.
The rollouts record the teacher the student was fine-tuned from (`regime.opd.sft_teacher`, or the recipe of
the distill run that trained it) and `distill rollouts`, `distill cache` and training refuse another teacher
(`regime.opd.teacher_consistency: warn` lets it through with a warning). A student with no such record gets
a warning: the check cannot be made.

Files: `manifest.json` (written first: the sampling student and the sha256 of its weights, the sampling
settings, the prompts' fingerprint, the SFT teacher; `complete` once every chunk is written) and
`chunk-00000.jsonl`, ... (256 prompts each, written atomically; a rerun keeps the finished chunks, so a killed
`distill rollouts` resumes). A row: id, prompt_ids, completion_ids, behavior_logprobs (per completion token,
the sampling student's log-probability at temperature 1, the convention of the trainer's own log-probs, so
the first step's ratios are 1), and the decoded prompt and completion. The chunks are JSON lines:
`datasets.load_dataset("json", data_files=".../chunk-*.jsonl")` reads them.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from tqdm.auto import tqdm

from distill.core.errors import DistillError, note_output_directory
from distill.core.io import atomic_write_json, atomic_write_text, writable_problem
from distill.lm.data import IGNORE_INDEX, Example, collate
from distill.lm.generate import sample
from distill.lm.regimes import prompt_of, sampling_generator, sampling_settings

MANIFEST = "manifest.json"
CHUNK_EXAMPLES = 256
FORMAT = "distill-rollouts"
FIELD = "regime.rollouts"
# Testing aid: stop as if killed after this many chunks were written (tests/test_rollouts.py).
STOP_AFTER_CHUNKS_ENV = "DISTILL_ROLLOUTS_STOP_AFTER_CHUNKS"


# ---- teacher consistency ---------------------------------------------------------------------------------

def trained_from(student_path: str | None) -> dict | None:
    """What a saved student was fine-tuned from, when it is the `student/` directory of a distill run: that
    run's teacher ({"identity", "source"}), or {"identity": None, ...} for a run's `alone/` student (trained on
    the data, no teacher). None when nothing is known (a model from elsewhere, a config-built student)."""
    if not student_path:
        return None
    directory = Path(student_path).expanduser()
    run_recipe = directory.parent / "recipe.yaml"
    if not directory.is_dir() or not run_recipe.is_file() or directory.name not in ("student", "alone"):
        return None
    try:
        raw = yaml.safe_load(run_recipe.read_text())
        teacher = raw["teacher"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    if directory.name == "alone":
        return {"identity": None, "source": f"{run_recipe} (the run's `alone` row: trained on the data alone)"}
    return {"identity": _teacher_identity_of(teacher, f"{run_recipe}: teacher"), "source": str(run_recipe)}


def _teacher_identity_of(teacher: dict, where: str) -> dict:
    from distill.lm.recipe import TeacherSpec
    from distill.lm.teacher.cache.store import recipe_teacher_identity

    try:
        spec = TeacherSpec.model_validate(teacher)
    except ValueError as error:
        raise DistillError(f"{where} is not a teacher section ({error})", field="regime.opd.sft_teacher",
                           fix="set regime.opd.sft_teacher to the teacher the student was fine-tuned from") from None
    return recipe_teacher_identity(spec)


def sft_teacher(recipe, student_path: str | None) -> dict | None:
    """The teacher the sampling student was fine-tuned from: regime.opd.sft_teacher when given, else what the
    student's run directory says (`trained_from`); None when unknown."""
    from distill.lm.teacher.cache.store import teacher_identity
    from distill.lm.models import resolve_model_path

    named = recipe.regime.opd.sft_teacher
    if named is not None:
        return {"identity": teacher_identity(resolve_model_path(named, "regime.opd.sft_teacher")),
                "source": "regime.opd.sft_teacher"}
    return trained_from(student_path)


def check_teacher_consistency(recorded: dict | None, recipe, where: str) -> None:
    """Refuse (or, with regime.opd.teacher_consistency: warn, warn about) a teacher other than the one the
    rollouts' student was fine-tuned from; warn when that teacher is unknown."""
    from distill.lm.teacher.cache.store import identity_differences, recipe_teacher_identity

    mode = recipe.regime.opd.teacher_consistency
    if mode == "off":
        return
    if recorded is None:
        warnings.warn(f"{where}: teacher consistency cannot be checked: nothing records which teacher the sampling "
                      "student was fine-tuned on (set regime.opd.sft_teacher, or sample a student saved by a distill "
                      "run); Lightning OPD needs the same teacher for the student's fine-tuning and for OPD",
                      stacklevel=2)
        return
    if recipe.teacher.served and recorded["identity"] is not None:
        warnings.warn(f"{where}: teacher consistency cannot be checked: a served teacher's weights cannot be "
                      f"fingerprinted from here; make sure the server runs the teacher the student was fine-tuned on "
                      f"(`{recorded['identity'].get('path', '?')}`, {recorded['source']})", stacklevel=2)
        return
    scoring = recipe_teacher_identity(recipe.teacher)
    if recorded["identity"] is None:
        problem = f"the sampling student was trained without a teacher ({recorded['source']})"
    else:
        differences = identity_differences(recorded["identity"], scoring)
        if not differences:
            return
        problem = (f"the sampling student was fine-tuned on another teacher ({recorded['source']}: "
                   f"`{recorded['identity'].get('path', recorded['identity'])}`; its {', '.join(differences)} "
                   f"differ from teacher `{recipe.teacher.path or recipe.teacher.model}`)")
    message = (f"{where}: teacher consistency: {problem}. Lightning OPD (arXiv 2604.13010) shows that OPD then "
               "converges to a biased fixed point, offline or online")
    if mode == "warn":
        warnings.warn(message, stacklevel=2)
        return
    raise DistillError(message, field="teacher.path",
                       fix="score with the teacher the student was fine-tuned on, fine-tune the student on this "
                           "teacher first, or set regime.opd.teacher_consistency: warn to go on anyway")


# ---- writing -------------------------------------------------------------------------------------------

def _prompts_fingerprint(examples: list[Example]) -> str:
    from distill.lm.teacher.cache.store import dataset_fingerprint, example_hash

    prompts = [prompt_of(e) for e in examples]
    return dataset_fingerprint([e.id for e in examples], [example_hash(p, p) for p in prompts])


def _sampling_student(recipe, student_path: str | None, teacher_path: str | None):
    """The model that samples: `student_path`, else the recipe's initial student (loaded from student.path, or
    built from the teacher's config with the run's seed, as `distill run` builds it; a LoRA student's fresh
    adapters change nothing, so its base samples)."""
    from distill.lm.models import DTYPES, build_student, load_causal_lm, load_config

    spec = recipe.student
    if student_path is not None:
        return load_causal_lm(student_path, "--student", DTYPES[spec.dtype], spec.trust_remote_code)
    if spec.path:
        return load_causal_lm(spec.path, "student.path", DTYPES[spec.dtype], spec.trust_remote_code)
    trust = recipe.teacher.trust_remote_code
    if spec.init_from_teacher_layers is not None:
        source = load_causal_lm(teacher_path, "teacher.path", trust_remote_code=trust)
    else:
        source = SimpleNamespace(config=load_config(teacher_path, "teacher.path", trust))
    return build_student(source, spec.config, spec.init_from_teacher_layers, recipe.train.seed, DTYPES[spec.dtype])


@torch.no_grad()
def token_logprobs(model, examples: list[Example], pad_token_id: int, vocab_size: int) -> list[list[float]]:
    """Per example, log p(token) of each completion token under `model` (temperature 1)."""
    batch = collate(examples, pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    values = torch.log_softmax(logits[:, :-1, :vocab_size].float(), -1).gather(
        -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [row[keep].tolist() for row, keep in zip(values, mask)]


def build_rollouts(recipe, overrides: tuple[str, ...] = (), *, out: str | None = None,
                   student: str | None = None) -> Path:
    """Sample (or finish sampling) the student's completions of the recipe's training prompts; return the
    rollouts directory."""
    from distill.core.recipe import load_recipe
    from distill.lm.data import load_data
    from distill.lm.models import (load_tokenizer, make_accelerator, quiet_transformers, resolve_model_path,
                                   weights_sha256)
    from distill.lm.tasks import get_task

    recipe = load_recipe(recipe, overrides)
    if recipe.task != "lm":
        raise DistillError(f"rollouts are a causal LM's samples; this recipe is `task: {recipe.task}`",
                           field="task", fix="give a causal-LM recipe (task: lm) with regime.kind: opd")
    regime = recipe.regime
    if regime.kind != "opd":
        raise DistillError(f"rollouts feed offline on-policy distillation; this recipe's regime is `{regime.kind}`",
                           field="regime.kind", fix="set regime: {kind: opd, rollouts: DIR}")
    if out is None and regime.rollouts is None:
        raise DistillError("no rollouts directory given", field=FIELD,
                           fix="pass --out DIR, or set regime.rollouts: DIR in the recipe")
    if recipe.objective.cross_tokenizer:
        raise DistillError("offline OPD needs teacher and student on one tokenizer", field="objective.cross_tokenizer",
                           fix="remove objective.cross_tokenizer")
    directory = Path(out or regime.rollouts).expanduser()
    quiet_transformers()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    task = get_task(recipe.data.builtin) if recipe.data.builtin else None
    if recipe.teacher.served and recipe.teacher.path is None and not recipe.student.path and student is None:
        raise DistillError("a served teacher with a config-built student: nothing local holds the tokenizer",
                           field="student.path", fix="give student.path (or teacher.path, a local copy)")
    tokenizer_source = (recipe.teacher.path, "teacher.path") if recipe.teacher.path else (
        recipe.student.path or student, "student.path")
    tokenizer = load_tokenizer(*tokenizer_source, recipe.teacher.trust_remote_code)
    _, _, examples, _ = load_data(recipe.data, tokenizer, task)
    student_path = student or recipe.student.path
    recorded = sft_teacher(recipe, student_path)
    check_teacher_consistency(recorded, recipe, "distill rollouts")  # before any sample is drawn
    teacher_path = resolve_model_path(recipe.teacher.path, "teacher.path") if recipe.teacher.path else None
    model = _sampling_student(recipe, student, teacher_path).eval()
    vocab_size = len(tokenizer)
    setup = SimpleNamespace(task=task, tokenizer=tokenizer, train_examples=examples)
    sampling = sampling_settings(recipe, setup, [model])
    identity = {"student": {"path": str(student_path) if student_path else "(built from student.config)",
                            "weights_sha256": weights_sha256(model)},
                "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                             "max_new_tokens": sampling.max_new_tokens, "eos_token_id": sampling.eos_token_id,
                             "seed": recipe.train.seed},
                "prompts": _prompts_fingerprint(examples), "examples": len(examples)}

    accelerator = make_accelerator()
    manifest_file = directory / MANIFEST
    if manifest_file.is_file():
        manifest = read_manifest(directory)
        if manifest["identity"] != identity:
            changed = sorted(k for k in identity if manifest["identity"].get(k) != identity[k])
            raise DistillError(f"`{directory}` holds rollouts of another {', '.join(changed)} than this recipe's",
                               field=FIELD, fix="give a new directory (--out or regime.rollouts), or delete this one "
                                                "to sample again")
        if manifest.get("complete"):
            return directory
    else:
        if directory.exists() and any(directory.iterdir()):
            raise DistillError(f"`{directory}` is not empty and holds no rollouts", field=FIELD,
                               fix="give a new or empty directory")
        problem = writable_problem(directory)
        if problem is not None:
            raise DistillError(f"`{directory}` cannot be written: {problem}", field=FIELD,
                               fix="give a directory on a writable disk")
        manifest = {"format": FORMAT, "version": 1, "identity": identity, "sft_teacher": recorded,
                    "chunk_examples": CHUNK_EXAMPLES, "complete": False}
        if accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(manifest_file, manifest)
    note_output_directory(directory)
    accelerator.wait_for_everyone()

    chunk_count = (len(examples) + CHUNK_EXAMPLES - 1) // CHUNK_EXAMPLES
    todo = [i for i in range(chunk_count) if i % accelerator.num_processes == accelerator.process_index
            and not (directory / f"chunk-{i:05d}.jsonl").is_file()]
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id or 0
    batch_size = recipe.eval.batch_size
    bar = tqdm(total=sum(len(examples[i * CHUNK_EXAMPLES:(i + 1) * CHUNK_EXAMPLES]) for i in todo),
               desc="student rollouts", disable=not accelerator.is_main_process, dynamic_ncols=True, unit="ex")
    written, tokens, started = 0, 0, time.perf_counter()
    for index in todo:
        rows = examples[index * CHUNK_EXAMPLES:(index + 1) * CHUNK_EXAMPLES]
        generator = sampling_generator(recipe.train.seed, index, 0, 0)  # per chunk: same samples after a resume
        lines = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            generation = sample(model, [prompt_of(e) for e in batch], max_new_tokens=sampling.max_new_tokens,
                                pad_token_id=pad, eos_token_id=sampling.eos_token_id,
                                temperature=sampling.temperature, top_p=sampling.top_p, generator=generator,
                                greedy=sampling.temperature == 0, vocab_size=vocab_size)
            sampled = [Example(p + c, [IGNORE_INDEX] * len(p) + c, e.id)
                       for e, p, c in zip(batch, generation.prompts(), generation.completions())]
            logprobs = token_logprobs(model, sampled, pad, vocab_size)
            for example, prompt, completion, values in zip(batch, generation.prompts(), generation.completions(),
                                                           logprobs):
                lines.append(json.dumps({"id": example.id, "prompt_ids": prompt, "completion_ids": completion,
                                         "behavior_logprobs": values,
                                         "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                                         "completion": tokenizer.decode(completion, skip_special_tokens=True)}))
            tokens += generation.new_tokens
            bar.update(len(batch))
        atomic_write_text(directory / f"chunk-{index:05d}.jsonl", "\n".join(lines) + "\n")
        written += 1
        if written == int(os.environ.get(STOP_AFTER_CHUNKS_ENV, "0")):
            raise SystemExit(f"{STOP_AFTER_CHUNKS_ENV}: simulated kill after {written} chunks")
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finished = [i for i in range(chunk_count) if (directory / f"chunk-{i:05d}.jsonl").is_file()]
        if len(finished) == chunk_count:
            manifest.update(complete=True, chunks=chunk_count,
                            written=time.strftime("%Y-%m-%d %H:%M:%S"),
                            last_pass={"tokens": tokens, "seconds": round(time.perf_counter() - started, 3)})
            atomic_write_json(manifest_file, manifest)
    accelerator.wait_for_everyone()
    return directory


# ---- reading -------------------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict:
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise DistillError(f"`{directory}` holds no rollouts (no {MANIFEST})", field=FIELD,
                           fix="write them first: distill rollouts <recipe>")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise DistillError(f"`{file}` cannot be read ({error})", field=FIELD,
                           fix="delete the directory and run distill rollouts again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("identity"), dict):
        raise DistillError(f"`{file}` is not a rollouts manifest", field=FIELD,
                           fix="give the directory `distill rollouts` wrote")
    return manifest


def load_rollouts(directory: str | Path, examples: list[Example]) -> tuple[list[Example], dict[str, list[float]],
                                                                           dict]:
    """The training examples with their completions replaced by the stored samples (same ids, same prompts,
    in the same order), each id's behavior log-probs, and the manifest. Refuses unfinished rollouts and
    rollouts of other prompts."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise DistillError(f"the rollouts in `{directory}` are unfinished (a `distill rollouts` was stopped)",
                           field=FIELD, fix="run distill rollouts <recipe> again: it finishes what is missing")
    if manifest["identity"].get("prompts") != _prompts_fingerprint(examples):
        raise DistillError(f"the rollouts in `{directory}` were sampled for other prompts than this recipe's "
                           "training data", field=FIELD, fix="sample them again for this data (distill rollouts "
                                                             "<recipe> --out NEW_DIR)")
    by_id: dict[str, dict] = {}
    for index in range(manifest["chunks"]):
        file = directory / f"chunk-{index:05d}.jsonl"
        try:
            lines = file.read_text().splitlines()
        except OSError as error:
            raise DistillError(f"`{file}` cannot be read ({error})", field=FIELD,
                               fix="delete the chunk and run distill rollouts again: it samples it anew") from None
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                row["prompt_ids"], row["completion_ids"], row["behavior_logprobs"]
            except (ValueError, KeyError, TypeError):
                raise DistillError(f"`{file}` line {number} is not a rollout row", field=FIELD,
                                   fix="delete the chunk and run distill rollouts again") from None
            by_id[str(row["id"])] = row
    out, behavior = [], {}
    for example in examples:
        row = by_id.get(example.id)
        if row is None or row["prompt_ids"] != prompt_of(example) or len(row["behavior_logprobs"]) != len(
                row["completion_ids"]):
            raise DistillError(f"the rollouts in `{directory}` lack a sample for training example `{example.id}` "
                               "or hold another prompt for it", field=FIELD,
                               fix="sample them again for this data (distill rollouts <recipe> --out NEW_DIR)")
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        out.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, example.id))
        behavior[example.id] = [float(v) for v in row["behavior_logprobs"]]
    return out, behavior, manifest
