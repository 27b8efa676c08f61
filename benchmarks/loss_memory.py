"""Memory and time of a distillation loss over a large vocabulary: naive PyTorch (full logits),
distill's chunked fused-linear loss, and Liger-Kernel's chunked `LigerFusedLinearJSDLoss`.

    python benchmarks/loss_memory.py [--tokens 2048 --hidden 512 --vocab 32000 151936] [--json FILE]

Each (implementation, vocabulary, loss) runs in its own subprocess: "memory added" is the peak
RSS during forward+backward minus the RSS just before the loss (inputs already allocated), and
"seconds" is one forward+backward after a warm-up call (Liger's torch.compile happens there).
Liger's JSD with beta=0 is KL(teacher||student), our forward_kl; it is the `bench` extra
(`pip install -e ".[bench]"`) and is skipped with a note when not installed.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

LOSSES = {"forward_kl": {"loss": "forward_kl", "beta": 0.0}, "jsd": {"loss": "jsd", "beta": 0.5}}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(impl: str, vocab: int, loss_name: str, tokens: int, hidden: int, threads: int, chunk_tokens: int | None):
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    student_hidden = (torch.randn(tokens, hidden, generator=generator)).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=generator) * hidden ** -0.5).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, generator=generator)
    teacher_weight = torch.randn(vocab, hidden, generator=generator) * hidden ** -0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[: tokens // 8] = -100  # a prompt share, as in real data
    spec = LOSSES[loss_name]

    if impl == "naive":
        from distill.losses import get_spec

        def step():
            logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            params = {"beta": spec["beta"]} if spec["loss"] == "jsd" else {}
            return get_spec(spec["loss"], kind="token").fn(logits, teacher_logits, labels != -100, **params)
    elif impl == "distill":
        from distill.losses.fused import TeacherSignal, fused_linear_distillation

        def step():
            params = {"beta": spec["beta"]} if spec["loss"] == "jsd" else {}
            return fused_linear_distillation(student_hidden, student_weight,
                                             TeacherSignal(hidden=teacher_hidden, weight=teacher_weight),
                                             labels=labels, loss=spec["loss"], chunk_size=chunk_tokens, **params)
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=spec["beta"],
                                        compiled=impl == "liger", chunk_size=chunk_tokens or 1024)

        def step():
            return liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)

    step().backward()  # warm-up (and compilation)
    student_hidden.grad = student_weight.grad = None
    gc.collect()
    before = current_rss_bytes()
    started = time.perf_counter()
    value = step()
    value.backward()
    seconds = time.perf_counter() - started
    print(json.dumps({"impl": impl, "vocab": vocab, "loss": loss_name, "seconds": seconds,
                      "added_bytes": max(peak_rss_bytes() - before, 0), "value": float(value)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--impls", nargs="+", default=["naive", "distill", "liger"],
                        choices=["naive", "distill", "liger", "liger-eager"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="tokens per chunk (default: distill's memory budget; Liger's default 1024)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "VOCAB", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, vocab, loss_name = args.worker
        worker(impl, int(vocab), loss_name, args.tokens, args.hidden, args.threads, args.chunk_tokens)
        return
    rows, notes = [], []
    for vocab in args.vocab:
        for loss_name in args.losses:
            for impl in args.impls:
                command = [sys.executable, __file__, "--worker", impl, str(vocab), loss_name, "--tokens",
                           str(args.tokens), "--hidden", str(args.hidden), "--threads", str(args.threads)]
                if args.chunk_tokens:
                    command += ["--chunk-tokens", str(args.chunk_tokens)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    notes.append(f"{impl} V={vocab} {loss_name}: failed ({last})")
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(f"  {impl:12s} V={vocab:<7d} {loss_name:10s} {row['seconds']:7.2f} s  "
                      f"+{row['added_bytes'] / 2**30:6.2f} GiB  loss={row['value']:.6f}", flush=True)
    print(f"\n{args.tokens} tokens, hidden {args.hidden}, {args.threads} threads; forward+backward of the loss")
    print("| V | loss | impl | seconds | memory added (GiB) | time / naive | memory / naive |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        naive = next((r for r in rows if r["impl"] == "naive" and r["vocab"] == row["vocab"]
                      and r["loss"] == row["loss"]), None)
        time_ratio = f"{row['seconds'] / naive['seconds']:.2f}" if naive else "-"
        memory_ratio = f"{row['added_bytes'] / max(naive['added_bytes'], 1):.3f}" if naive else "-"
        print(f"| {row['vocab']} | {row['loss']} | {row['impl']} | {row['seconds']:.2f} | "
              f"{row['added_bytes'] / 2**30:.2f} | {time_ratio} | {memory_ratio} |")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tokens": args.tokens, "hidden": args.hidden, "threads": args.threads, "rows": rows,
                       "notes": notes}, handle, indent=1)


if __name__ == "__main__":
    main()
