"""Seconds per training step and peak memory: distill vs TRL's GKD trainer, same models, same
data, same first batch, JSD(beta=0.5), off-policy (TRL lmbda=0), same thread count.

    python benchmarks/step_vs_trl.py [--steps 30 --threads 2] [--json FILE]

Teacher: Llama-style hidden 256 x 4 layers; student 128 x 2; V=4096; batch 8 x 128 tokens
(the first 32 of each a prompt, masked). Both are built from configs once and saved, so every
process loads identical weights. Each trainer runs in its own process; TRL twice: with its
defaults (bf16 autocast and gradient checkpointing) and in fp32 without checkpointing. The
step-1 losses must agree (same math on the same batch). TRL is the `bench` extra.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, TOKENS, PROMPT_TOKENS, BATCH = 4096, 128, 32, 8


def prepare(directory: Path, steps: int) -> None:
    """Teacher, student, tokenizer and a jsonl of prompt/completion rows in `directory`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from distill.lm.models import tiny_llama_config
    from distill.lm.tasks.vocab import SPECIAL_TOKENS, word_level_tokenizer

    tokenizer = word_level_tokenizer([f"t{i}" for i in range(VOCAB - len(SPECIAL_TOKENS))])
    for name, hidden, layers, seed in (("teacher", 256, 4, 0), ("student", 128, 2, 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden_size=hidden,
                                                                   num_hidden_layers=layers, num_attention_heads=4))
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(steps * BATCH):
        # A sequence of TOKENS tokens in all: BOS + prompt words + completion words + EOS.
        words = [f"t{i}" for i in rng.integers(0, VOCAB - len(SPECIAL_TOKENS), size=TOKENS - 2)]
        rows.append({"prompt": " ".join(words[:PROMPT_TOKENS - 1]), "completion": " ".join(words[PROMPT_TOKENS - 1:])})
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # distill.run ends with an evaluation that TRL does not do: keep it to one small batch.
    (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:BATCH]))


def run_distill(directory: Path, steps: int, threads: int) -> dict:
    import distill

    result = distill.run({
        "teacher": {"path": str(directory / "teacher")}, "student": {"path": str(directory / "student")},
        "data": {"train": str(directory / "train.jsonl"), "eval": str(directory / "eval.jsonl"),
                 "max_length": TOKENS, "too_long": "refuse"},
        "objective": {"loss": "jsd", "beta": 0.5},
        "train": {"steps": steps, "batch_size": BATCH, "lr": 1e-4, "max_grad_norm": 1.0, "baseline": False,
                  "threads": threads, "log_every": 1, "checkpoint_every": 10**6, "schedule": "constant"},
        "eval": {"every": 10**6, "generate_size": 0, "throughput_tokens": 1, "batch_size": BATCH},
        "output": str(directory / "distill-run")}, overwrite=True)
    records = [json.loads(line) for line in (result.run_dir / "losses.jsonl").read_text().splitlines()]
    return {"step_seconds": [r["step_seconds"] for r in records], "first_loss": records[0]["loss"]}


def run_trl(directory: Path, steps: int, threads: int, defaults: bool) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.lm.data import BatchOrder, collate, read_records, tokenize

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(directory / "teacher")
    examples = tokenize(read_records(str(directory / "train.jsonl"), "data"), tokenizer, max_length=TOKENS,
                        too_long="refuse", completion_only=True, append_eos=True, field="data")
    # The order distill's BatchOrder takes (seed 0), read sequentially: the same first batch.
    ordered = [examples[i] for i in BatchOrder(len(examples), 0).take(0, len(examples))]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in ordered])

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    options = dict(output_dir=str(directory / "trl-run"), per_device_train_batch_size=BATCH, max_steps=steps,
                   lmbda=0.0, beta=0.5, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                   max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                   dataloader_num_workers=0, max_length=TOKENS, seed=0, disable_tqdm=True)
    if not defaults:
        options.update(bf16=False, gradient_checkpointing=False)
    timer = StepTimer()
    trainer = Sequential(model=AutoModelForCausalLM.from_pretrained(directory / "student"),
                         teacher_model=AutoModelForCausalLM.from_pretrained(directory / "teacher"),
                         args=GKDConfig(**options), train_dataset=dataset, processing_class=tokenizer,
                         data_collator=lambda rows: collate([type(examples[0])(r["input_ids"], r["labels"]) for r in rows],
                                                            tokenizer.pad_token_id), callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": timer.seconds, "first_loss": losses[0], "bf16": trainer.args.bf16,
            "gradient_checkpointing": trainer.args.gradient_checkpointing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", choices=["distill", "trl-defaults", "trl-fp32"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        directory = Path(args.dir)
        if args.worker == "distill":
            figures = run_distill(directory, args.steps, args.threads)
        else:
            figures = run_trl(directory, args.steps, args.threads, defaults=args.worker == "trl-defaults")
        figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("RESULT " + json.dumps(figures))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.steps)
        for worker in ("distill", "trl-defaults", "trl-fp32"):
            done = subprocess.run([sys.executable, __file__, "--worker", worker, "--dir", tmp, "--steps",
                                   str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{worker}: failed\n{done.stderr[-2000:]}")
                continue
            rows[worker] = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"\n{args.steps} steps, batch {BATCH} x {TOKENS} tokens, V={VOCAB}, {args.threads} threads "
          "(seconds per step: median of steps 2..N)")
    print("| trainer | s/step | peak RSS (GiB) | step-1 loss | distill speed-up | memory vs distill |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for worker, figures in rows.items():
        steady = sorted(figures["step_seconds"][1:]) or figures["step_seconds"]
        summary[worker] = {**figures, "median_step_seconds": steady[len(steady) // 2]}
    base = summary.get("distill")
    for worker, figures in summary.items():
        speedup = f"{figures['median_step_seconds'] / base['median_step_seconds']:.2f}x" if base else "-"
        memory = f"{figures['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}" if base else "-"
        print(f"| {worker} | {figures['median_step_seconds']:.3f} | {figures['peak_rss_bytes'] / 2**30:.2f} | "
              f"{figures['first_loss']:.6f} | {speedup} | {memory} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
