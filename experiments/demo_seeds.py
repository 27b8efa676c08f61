"""`distill demo` over several seeds, as one `distill sweep`: each row's metrics as mean and spread.

    python experiments/demo_seeds.py --seeds 0 1 2 --out runs/demo-seeds [--jobs 2] [--json FILE]

The same runs as `distill demo --seed S` (builtin:oracle-demo with train.seed = data.seed = S: the
student init, data order and which oracle sequences are drawn), so the published numbers reproduce;
the equivalent command is

    distill sweep builtin:oracle-demo --seeds 0,1,2 --seed-field train.seed --seed-field data.seed

whose table is the distilled row with 95% t intervals. This script adds every row (teacher, alone,
distilled) as mean ± half-range, the table docs/experiments.md has always shown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("oracle_forward_kl", "oracle_reverse_kl", "nll", "teacher_top1_agreement", "teacher_kl",
           "generation_tokens_per_second")


def main() -> None:
    import distill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", help="write the per-seed rows and the summary here")
    args = parser.parse_args()
    result = distill.sweep("builtin:oracle-demo", {}, seeds=args.seeds, output=args.out, jobs=args.jobs,
                           seed_fields=["train.seed", "data.seed"], progress=print)
    per_seed = {int(seed): rows for seed, rows in result.points[0]["all_rows"].items()}
    seeds = sorted(per_seed)
    summary = {row: {metric: [per_seed[s][row][metric] for s in seeds if metric in per_seed[s][row]]
                     for metric in METRICS} for row in ("teacher", "alone", "distilled")}
    print(f"seeds {seeds}")
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
    wins = sum(per_seed[s]["distilled"]["oracle_forward_kl"] < per_seed[s]["alone"]["oracle_forward_kl"] for s in seeds)
    print(f"distilled beats alone on exact KL to the oracle in {wins}/{len(seeds)} seeds")
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps({"per_seed": per_seed, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
