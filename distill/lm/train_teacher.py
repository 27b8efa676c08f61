"""`distill train-teacher builtin:<task>`: train a built-in task's teacher with the same trainer
(plain cross-entropy), and save it as a normal `save_pretrained` model + tokenizer."""
from __future__ import annotations

import json

import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.core.errors import DistillError
from distill.core.io import atomic_write_json
from distill.core.metrics import count_parameters
from distill.core.rundir import RunDirectory
from distill.lm.data import tokenize
from distill.lm.evaluate import evaluate_model
from distill.lm.models import make_accelerator, quiet_transformers, save_model, tiny_llama_config
from distill.lm.objective import TokenObjective
from distill.lm.recipe import TrainSpec
from distill.lm.regimes import Distill
from distill.lm.tasks import get_task
from distill.lm.trainer import LMTrainer


TEACHER_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")  # what --config may set


def train_teacher(task_name: str, out: str | Path, *, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3,
                  train_size: int = 50000, eval_size: int = 200, seed: int = 0, warmup_steps: int = 100,
                  threads: int | None = None, overwrite: bool = False, resume: bool = False,
                  model_overrides: dict | None = None, tokenizer: str | None = None) -> dict:
    """Train the teacher of `builtin:<task>` into `out`; returns its final eval metrics. `tokenizer="bpe"`
    (oracle only): on the oracle's byte-level BPE (`OracleTask.student_tokenizer`), scored per symbol."""
    quiet_transformers()
    task = get_task(task_name.removeprefix("builtin:"))
    if tokenizer not in (None, "bpe") or (tokenizer == "bpe" and not hasattr(task, "student_tokenizer")):
        raise DistillError(f"--tokenizer {tokenizer} is not available for builtin:{task.name}", field="--tokenizer",
                           fix="use --tokenizer bpe with builtin:oracle, or leave it out")
    sizes = {**task.teacher_config, **(model_overrides or {})}
    unknown = sorted(set(sizes) - set(TEACHER_SIZES))
    if unknown or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        raise DistillError(f"--config {model_overrides}: " + (f"unknown keys {', '.join(unknown)}" if unknown else
                           "sizes are positive whole numbers"), field="--config",
                           fix=f"give positive integers for: {', '.join(TEACHER_SIZES)}")
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise DistillError(f"hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads "
                           f"{sizes['num_attention_heads']}", field="--config", fix="make it one")
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise DistillError(f"`{out}` already holds a model", field="--out", fix="pass --overwrite or choose another --out")
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    accelerator = make_accelerator()
    tokenizer_name, tokenizer = tokenizer, (task.student_tokenizer() if tokenizer == "bpe" else task.tokenizer())
    options = dict(max_length=256, too_long="refuse", completion_only=True, append_eos=task.append_eos)
    train_examples = tokenize(task.records(train_size, seed, "train"), tokenizer, field="data.train", **options)
    eval_records = task.records(eval_size, seed, "eval")
    eval_examples = tokenize(eval_records, tokenizer, field="data.eval", **options)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), **sizes)
    model = AutoModelForCausalLM.from_config(config)
    spec = TrainSpec(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(warmup_steps, steps // 10), seed=seed,
                     checkpoint_every=max(steps // 5, 1), log_every=50, baseline=False)
    work = out.with_name(out.name + ".work")  # checkpoints and logs while training
    if work.exists() and not resume and accelerator.is_main_process:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    def evaluate(candidate, final: bool = False):
        return evaluate_model(candidate, task=task, tokenizer=tokenizer, eval_records=eval_records,
                              eval_examples=eval_examples, vocab_size=len(tokenizer), batch_size=64,
                              generate_size=64, seed=seed, throughput_tokens=64 if final else None)

    logs = RunDirectory(work, resume=resume)
    logs.is_main = accelerator.is_main_process
    objective = TokenObjective(None, vocab_size=len(tokenizer), memory_budget_bytes=int(spec.loss_memory_mb * 2**20))
    trainer = LMTrainer(accelerator=accelerator, student=model, regime=Distill(objective), phase="teacher",
                        examples=train_examples, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                        spec=spec, eval_every=max(steps // 10, 1), evaluate=evaluate, run_dir=logs)
    trainer.fit(resume=resume)
    model = trainer.model.eval()
    metrics = evaluate(model, final=True) if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        save_model(model, tokenizer, out)
        card = {"task": task.name, "metrics": metrics, "parameters": count_parameters(model),
                "seconds": round(time.perf_counter() - started, 1),
                "command": f"distill train-teacher builtin:{task.name} --out {out} --steps {steps} --batch-size "
                           f"{batch_size} --lr {lr} --train-size {train_size} --seed {seed}"
                           + (f" --tokenizer {tokenizer_name}" if tokenizer_name else "")
                           + (f" --config '{json.dumps(model_overrides)}'" if model_overrides else "")}
        atomic_write_json(out / "teacher_card.json", card)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return metrics
