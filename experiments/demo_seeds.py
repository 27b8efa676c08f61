"""Run `distill demo` for several seeds and summarise each row's metrics as mean and spread.

    python experiments/demo_seeds.py --seeds 0 1 2 --out runs/demo-seeds [--json FILE]

Each seed changes the student init, data order and which oracle sequences are drawn. Prints a
markdown table (mean ± half-range over seeds) ready for docs/experiments.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("oracle_forward_kl", "oracle_reverse_kl", "nll", "teacher_top1_agreement", "teacher_kl",
           "generation_tokens_per_second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds")
    parser.add_argument("--json", help="write the per-seed rows and the summary here")
    args = parser.parse_args()
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed{seed}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distill", "demo", "--seed", str(seed), "--output", str(run_dir),
                        "--overwrite"], check=True)
        seconds[seed] = time.perf_counter() - started
        per_seed[seed] = json.loads((run_dir / "results.json").read_text())["rows"]
    summary = {row: {metric: [per_seed[s][row][metric] for s in args.seeds if metric in per_seed[s][row]]
                     for metric in METRICS} for row in ("teacher", "alone", "distilled")}
    print(f"seeds {args.seeds}; wall seconds per demo: " + ", ".join(f"{seconds[s]:.0f}" for s in args.seeds))
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for row, metrics in summary.items():
        cells = []
        for metric in METRICS:
            values = metrics[metric]
            if not values:
                cells.append("-")
                continue
            spread = (max(values) - min(values)) / 2
            fmt = ",.0f" if metric == "generation_tokens_per_second" else ".4f"
            cells.append(f"{statistics.mean(values):{fmt}} ± {spread:{fmt}}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    wins = sum(per_seed[s]["distilled"]["oracle_forward_kl"] < per_seed[s]["alone"]["oracle_forward_kl"] for s in args.seeds)
    print(f"distilled beats alone on exact KL to the oracle in {wins}/{len(args.seeds)} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_seed": per_seed, "seconds": seconds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
