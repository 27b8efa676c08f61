"""Sequence-level KD: the teacher completes the training prompts once, and the student trains on
its completions (CE and/or logit KD) instead of the data's (Kim & Rush 2016).

The generations are stored in the run directory, one jsonl file per chunk of prompts, each
written atomically; a resumed run reuses the finished chunks and generates only the rest.
Chunks are shared round-robin between processes. Sampling is seeded by (seed, chunk), so a
chunk's completions do not depend on the number of processes or on interruptions.

Student-aware filtering (reverse speculative decoding, `regime.rsd_threshold`): the teacher proposes
each token and the initial student vetoes the ones it finds too unlikely, replacing them with its own
sample, so the student learns text it can follow. `throughput.json` records how many were replaced.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from distill.core.io import atomic_write_json, atomic_write_text
from distill.lm.data import IGNORE_INDEX, Example
from distill.lm.generate import sample
from distill.lm.regimes import Sampling, prompt_of, sampling_generator

CHUNK_EXAMPLES = 256
GENERATIONS_DIR = "teacher-generations"
# Testing aid: stop as if killed after this many chunks were written (tests/test_sequence.py).
STOP_AFTER_CHUNKS_ENV = "DISTILL_SEQUENCE_STOP_AFTER_CHUNKS"


def teacher_sequences(teacher, examples: list[Example], settings: Sampling, run_dir: Path, *, accelerator,
                      pad_token_id: int, vocab_size: int, seed: int, batch_size: int, student=None) -> list[Example]:
    """The examples with their completions replaced by the teacher's (same ids, same prompts). `teacher` is a
    causal LM, or a served teacher (its `complete`: the server samples).

    With `student` and `settings.filter_threshold > 0`, teacher tokens the student gives less than the
    threshold are replaced by student samples (reverse speculative decoding)."""
    distinct = len({tuple(prompt_of(e)) for e in examples})
    if settings.temperature == 0 and distinct <= len(examples) // 2:
        warnings.warn(f"regime sequence with greedy decoding (sample_temperature: 0): the {len(examples)} training "
                      f"examples have only {distinct} distinct prompt(s), so the student learns only {distinct} "
                      "distinct completion(s); set regime.sample_temperature > 0 (e.g. 1) to learn the teacher's "
                      "distribution", stacklevel=2)
    filter_model = student if settings.filter_threshold > 0 else None

    directory = run_dir / GENERATIONS_DIR
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    chunks = range(0, len(examples), CHUNK_EXAMPLES)
    todo = [i for i, start in enumerate(chunks) if i % accelerator.num_processes == accelerator.process_index
            and not (directory / f"chunk-{i:05d}.jsonl").is_file()]
    bar = tqdm(total=sum(min(CHUNK_EXAMPLES, len(examples) - i * CHUNK_EXAMPLES) for i in todo),
               desc="teacher generations", disable=not accelerator.is_main_process, dynamic_ncols=True, unit="ex")
    written, tokens, seconds, replaced = 0, 0, 0.0, 0
    for index in todo:
        rows = examples[index * CHUNK_EXAMPLES:(index + 1) * CHUNK_EXAMPLES]
        generator = sampling_generator(seed, index, 0, 0)
        lines = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            if hasattr(teacher, "complete"):  # a served teacher generates on its server (seeded per request)
                began = time.perf_counter()
                completions = teacher.complete([prompt_of(e) for e in batch], max_tokens=settings.max_new_tokens,
                                               temperature=settings.temperature, top_p=settings.top_p,
                                               seed=(generator.initial_seed() + start) % 2**31,
                                               eos_token_id=settings.eos_token_id)
                tokens, seconds = tokens + sum(map(len, completions)), seconds + time.perf_counter() - began
                for example, completion in zip(batch, completions):
                    lines.append(json.dumps({"id": example.id, "prompt_ids": prompt_of(example),
                                             "completion_ids": completion}))
                bar.update(len(batch))
                continue
            generation = sample(teacher, [prompt_of(e) for e in batch], max_new_tokens=settings.max_new_tokens,
                                pad_token_id=pad_token_id, eos_token_id=settings.eos_token_id,
                                temperature=settings.temperature, top_p=settings.top_p, generator=generator,
                                greedy=settings.temperature == 0, vocab_size=vocab_size, filter_model=filter_model,
                                filter_threshold=settings.filter_threshold)
            tokens, seconds = tokens + generation.new_tokens, seconds + generation.seconds
            replaced += generation.replaced
            for example, prompt, completion in zip(batch, generation.prompts(), generation.completions()):
                lines.append(json.dumps({"id": example.id, "prompt_ids": prompt, "completion_ids": completion}))
            bar.update(len(batch))
        atomic_write_text(directory / f"chunk-{index:05d}.jsonl", "\n".join(lines) + "\n")
        written += 1
        if written == int(os.environ.get(STOP_AFTER_CHUNKS_ENV, "0")):
            raise SystemExit(f"{STOP_AFTER_CHUNKS_ENV}: simulated kill after {written} chunks")
    bar.close()
    if todo and accelerator.is_main_process:
        atomic_write_json(directory / "throughput.json", (
            {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
             "rsd_threshold": settings.filter_threshold, "replaced_tokens": replaced,
             "replaced_share": replaced / max(tokens, 1), "written": time.strftime("%Y-%m-%d %H:%M:%S")}))
    accelerator.wait_for_everyone()
    by_id = {}
    for index, _ in enumerate(chunks):
        for line in (directory / f"chunk-{index:05d}.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_id[row["id"]] = row
    out = []
    for example in examples:
        row = by_id[example.id]
        prompt = row["prompt_ids"]
        out.append(Example(prompt + row["completion_ids"], [IGNORE_INDEX] * len(prompt) + row["completion_ids"],
                           example.id))
    return out
