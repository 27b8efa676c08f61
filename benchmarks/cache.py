"""The offline teacher cache: bytes per token, student quality from the cache vs the live teacher,
and training throughput from the cache vs the live teacher.

    python benchmarks/cache.py [--seeds 0 1 2] [--tasks oracle arithmetic] [--k 64] [--json FILE]
    python benchmarks/cache.py --only bytes          # seconds: storage only

1. Bytes per token for k in {8, 32, 64, 128}, every id coding x value storage:
   - at V=151936 (Qwen's vocabulary) on synthetic teacher distributions: a Zipfian unigram prior
     plus per-token noise, so top-k ids cluster at frequent tokens as a real LM's do; one shard of
     4096 tokens written with the real shard writer (file bytes, headers included);
   - on the oracle task (V=68): real caches built by `distill cache` from the shipped teacher.
2. Quality: for each task and seed, the task's shipped recipe distilled from the live teacher and
   from its cache at `--k` (the "alone" baseline off, same steps and seeds); the task metric's
   mean and spread, and the relative gap.
3. Throughput: median training tokens/s of the distilled phase (losses.jsonl), cache / live.

Targets (issue 5): <= 200 bytes/token at k=64 (V=151936); task metric within 1% (relative) of
live-teacher KD at k=64; training from the cache faster than with the live teacher. Run it with
nothing else computing: the throughput ratio is a timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"oracle": ROOT / "distill" / "recipes" / "oracle-demo.yaml", "arithmetic": ROOT / "recipes" / "arithmetic.yaml"}
CODINGS = [("rice", "int8"), ("rice", "float16"), ("packed", "int8"), ("packed", "float16")]


def synthetic_bytes(k: int, vocab: int = 151936, tokens: int = 4096) -> dict[str, float]:
    """Bytes/token of one real shard per coding, on Zipf-like synthetic teacher distributions."""
    import numpy as np
    import torch

    from distill.lm.teacher.cache.build import teacher_topk
    from distill.lm.teacher.cache.codec import encode_topk
    from distill.lm.teacher.cache.store import write_shard

    generator = torch.Generator().manual_seed(0)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))  # Zipf: p(rank r) ~ r^-1.1
    prior = prior[torch.randperm(vocab, generator=generator)]  # frequent tokens spread over the id range
    out = {}
    with tempfile.TemporaryDirectory() as directory:
        ids, logprobs, tail = [], [], []
        for start in range(0, tokens, 512):
            logits = prior + 2.5 * torch.randn(512, vocab, generator=generator)
            top_ids, top_logprobs, top_tail = teacher_topk(logits, k)
            ids.append(top_ids), logprobs.append(top_logprobs), tail.append(top_tail)
        ids, logprobs, tail = (torch.cat(x).numpy() for x in (ids, logprobs, tail))
        for id_scheme, values in CODINGS:
            arrays = encode_topk(ids, logprobs, tail, vocab_size=vocab, ids_scheme=id_scheme, values=values)
            arrays["tokens"] = np.array([tokens], dtype=np.int32)
            entry = write_shard(Path(directory) / f"{id_scheme}-{values}.safetensors", arrays,
                                {"example_ids": ["0"], "example_hashes": ["0" * 16]})
            out[f"{id_scheme}+{values}"] = entry["bytes"] / tokens
    return out


def run_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, cwd=ROOT)


def oracle_bytes(ks: list[int], workdir: Path) -> dict[int, dict[str, float]]:
    """Bytes/token of real caches of the oracle teacher (1000 training sequences)."""
    out = {}
    for k in ks:
        if k > 68:
            continue
        out[k] = {}
        for id_scheme, values in CODINGS:
            directory = workdir / f"oracle-k{k}-{id_scheme}-{values}"
            run_cli("cache", str(RECIPES["oracle"]), "--out", str(directory), "--k", str(k), "--ids", id_scheme,
                    "--values", values)
            out[k][f"{id_scheme}+{values}"] = json.loads((directory / "manifest.json").read_text())["bytes_per_token"]
    return out


def median_tokens_per_second(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in rows if r["phase"] == "distilled")


def quality(task: str, seeds: list[int], k: int, workdir: Path, steps: int | None) -> dict:
    """Task metric and throughput of live-teacher KD vs cache KD, per seed."""
    from distill.lm.models import load_tokenizer
    from distill.lm.recipe import load_recipe

    recipe = RECIPES[task]
    k = min(k, len(load_tokenizer(load_recipe(recipe).teacher.path, "teacher.path")))  # k <= V
    common = ["--set", "train.baseline=false", "--overwrite"]
    if steps:
        common += ["--set", f"train.steps={steps}"]
    per_seed = []
    for seed in seeds:
        seeded = ["--set", f"train.seed={seed}", "--set", f"data.seed={seed}"]
        cache_dir = workdir / f"{task}-teacher-cache-seed{seed}"
        started = time.perf_counter()
        run_cli("cache", str(recipe), *seeded, "--out", str(cache_dir), "--k", str(k))
        cache_seconds = time.perf_counter() - started
        rows = {}
        for mode in ("live", "cache"):
            out = workdir / f"{task}-{mode}-seed{seed}"
            extra = ["--set", "regime.kind=cache", "--set", f"regime.path={cache_dir}", "--set", f"regime.k={k}"] \
                if mode == "cache" else []
            run_cli("run", str(recipe), *seeded, *common, *extra, "--set", f"output={out}")
            results = json.loads((out / "results.json").read_text())
            metric = results["primary_metric"]
            rows[mode] = {"metric": metric, "value": results["rows"]["distilled"][metric],
                          "tokens_per_second": median_tokens_per_second(out)}
        per_seed.append({"seed": seed, "cache_build_seconds": cache_seconds, **rows})
    return {"task": task, "k": k, "per_seed": per_seed}


def summarise(result: dict) -> list[str]:
    lines = []
    for block in result.get("quality", []):
        live = [s["live"]["value"] for s in block["per_seed"]]
        cached = [s["cache"]["value"] for s in block["per_seed"]]
        speed = [s["cache"]["tokens_per_second"] / s["live"]["tokens_per_second"] for s in block["per_seed"]]
        metric = block["per_seed"][0]["live"]["metric"]

        def spread(values):
            return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"
        gap = (statistics.mean(cached) - statistics.mean(live)) / abs(statistics.mean(live))
        lines.append(f"| {block['task']} | {metric} | {block['k']} | {spread(live)} | {spread(cached)} | "
                     f"{gap:+.2%} | {statistics.mean(speed):.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["oracle", "arithmetic"], choices=list(RECIPES))
    parser.add_argument("--k", type=int, default=64, help="k of the quality and throughput runs")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128], help="k of the bytes table")
    parser.add_argument("--steps", type=int, default=None, help="override the recipes' train.steps (quick runs)")
    parser.add_argument("--only", choices=["bytes", "quality"], default=None)
    parser.add_argument("--workdir", default="runs/bench-cache")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    workdir = (ROOT / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.only in (None, "bytes"):
        result["synthetic_bytes"] = {k: synthetic_bytes(k) for k in args.ks}
        result["oracle_bytes"] = oracle_bytes(args.ks, workdir)
        print("\nbytes per token (shard files, headers included)")
        print("| data | k | " + " | ".join(f"{i}+{v}" for i, v in CODINGS) + " |")
        print("|---|---|" + "---|" * len(CODINGS))
        for name, table in (("synthetic V=151936", result["synthetic_bytes"]), ("oracle V=68", result["oracle_bytes"])):
            for k, row in table.items():
                print(f"| {name} | {k} | " + " | ".join(f"{row[f'{i}+{v}']:.1f}" for i, v in CODINGS) + " |")
    if args.only in (None, "quality"):
        result["quality"] = [quality(task, args.seeds, args.k, workdir, args.steps) for task in args.tasks]
        print(f"\nstudent from the live teacher vs from its cache (seeds {args.seeds}; mean ± half-range)")
        print("| task | metric | k | live teacher | cache | cache vs live | train tok/s cache / live |")
        print("|---|---|---|---|---|---|---|")
        for line in summarise(result):
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
