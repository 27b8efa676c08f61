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
from distill.lm.evaluate import evaluate_model
from distill.lm.models import count_parameters, quiet_transformers, tiny_llama_config
from distill.lm.recipe import TrainSpec
from distill.lm.tasks import get_task
from distill.lm.trainer import LMTrainer, Phase


def train_teacher(task_name: str, out: str | Path, *, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3,
                  train_size: int = 50000, eval_size: int = 200, seed: int = 0, warmup_steps: int = 100,
                  threads: int | None = None, overwrite: bool = False, resume: bool = False,
                  model_overrides: dict | None = None) -> dict:
    """Train the teacher of `builtin:<task>` into `out`; returns its final eval metrics."""
    from distill.lm.data import tokenize
    from distill.lm.run import make_accelerator, _save_model_atomically

    quiet_transformers()
    task = get_task(task_name.removeprefix("builtin:"))
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise DistillError(f"`{out}` already holds a model", field="--out", fix="pass --overwrite or choose another --out")
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    accelerator = make_accelerator()
    tokenizer = task.tokenizer()
    options = dict(max_length=256, too_long="refuse", completion_only=True, append_eos=task.append_eos)
    train_examples = tokenize(task.records(train_size, seed, "train"), tokenizer, field="data.train", **options)
    eval_records = task.records(eval_size, seed, "eval")
    eval_examples = tokenize(eval_records, tokenizer, field="data.eval", **options)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), **{**task.teacher_config, **(model_overrides or {})})
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

    trainer = LMTrainer(accelerator=accelerator, student=model, phase=Phase("teacher", work / "checkpoint"),
                        examples=train_examples, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                        spec=spec, eval_every=max(steps // 10, 1), evaluate=evaluate,
                        metrics_file=work / "metrics.jsonl", losses_file=work / "losses.jsonl")
    trainer.fit(resume=resume)
    model = trainer.model.eval()
    metrics = evaluate(model, final=True) if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        _save_model_atomically(model, tokenizer, out)
        card = {"task": task.name, "metrics": metrics, "parameters": count_parameters(model),
                "seconds": round(time.perf_counter() - started, 1),
                "command": f"distill train-teacher builtin:{task.name} --out {out} --steps {steps} --batch-size "
                           f"{batch_size} --lr {lr} --train-size {train_size} --seed {seed}"}
        (out / "teacher_card.json").write_text(json.dumps(card, indent=1) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return metrics
