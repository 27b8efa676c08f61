"""Generation throughput: distill's KV-cache sampler against `model.generate`, side by side in one run,
and the cost of student-aware filtering (reverse speculative decoding: the student scores every
teacher proposal).

    python benchmarks/generate.py [--batch 32] [--new-tokens 64] [--repeats 5] [--threads 1] [--json FILE]

Models: the shipped oracle teacher (Llama, V=68, hidden 128, 4 layers) and a student of the regimes
experiments' shape (hidden 64, 2 layers), prompts = BOS. Each configuration is timed `--repeats`
times after one warm-up; the median generated tokens/s is reported. Run it with nothing else
computing: the figures are timings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _median_tokens_per_second(generate, repeats: int) -> float:
    generate()  # warm-up: allocator, first-call dispatch
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = generate()
        speeds.append(tokens / (time.perf_counter() - started))
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from distill.lm.models import load_causal_lm, load_tokenizer, quiet_transformers, tiny_llama_config
    from distill.lm.generate import sample

    quiet_transformers()
    teacher = load_causal_lm("builtin:oracle-teacher", "teacher.path").eval()
    tokenizer = load_tokenizer("builtin:oracle-teacher", "teacher.path")
    vocab = len(tokenizer)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(
        teacher.config.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=teacher.config.max_position_embeddings)).eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    prompts = [[bos]] * args.batch
    pad = tokenizer.pad_token_id or 0
    generator = torch.Generator().manual_seed(0)

    def ours(model, **options):
        return lambda: sample(model, prompts, max_new_tokens=args.new_tokens, pad_token_id=pad, eos_token_id=None,
                              generator=generator, vocab_size=vocab, **options).new_tokens

    def hf(model):
        input_ids = torch.tensor(prompts)

        @torch.no_grad()
        def run() -> int:
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=pad)
            return int(out.shape[0] * (out.shape[1] - input_ids.shape[1]))
        return run

    figures = {"batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
               "torch": torch.__version__}
    rows = [("teacher, distill sample()", "teacher_distill", ours(teacher)),
            ("teacher, model.generate", "teacher_hf", hf(teacher)),
            ("student, distill sample()", "student_distill", ours(student)),
            ("student, model.generate", "student_hf", hf(student)),
            ("teacher + student filter (RSD, threshold 0.05)", "teacher_rsd",
             ours(teacher, filter_model=student, filter_threshold=0.05))]
    for label, key, generate in rows:
        figures[key] = _median_tokens_per_second(generate, args.repeats)
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    print("| configuration | generated tokens/s | vs model.generate |")
    print("|---|---|---|")
    for label, key, _ in rows:
        reference = figures["student_hf" if key.startswith("student") else "teacher_hf"]
        print(f"| {label} | {figures[key]:,.0f} | {figures[key] / reference:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
