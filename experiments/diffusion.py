"""Few-step students of a diffusion teacher on an imbalanced 8-mode ring (gmm2d) or on 8x8 digits, 3 seeds.

    python experiments/diffusion.py [--task gmm2d|digits] [--parts divergences methods] [--seeds 0 1 2] [--json FILE]

1. divergences: one-step DMD with reverse KL (plain DMD) vs forward KL vs Jensen-Shannon weighting
   (f-distill); mode coverage, the rarest mode's mass, MMD.
2. methods: DMD (1 step) vs consistency (1, 2, 4 steps) vs progressive (1, 2, 4 steps) against the
   teacher's Euler sampler at 1-64 steps.
Teacher: the shipped gmm2d denoiser (`builtin:gmm2d-teacher`; mixture: 8 modes, the commonest 10x the
rarest, radius 2, std 0.05). Every model samples 2,000 points from the same noise; the noise-floor row
is exact data against exact data. Seeds change the student's training randomness and the eval noise.
Prints mean ± std over seeds, and the share of seeds where the rarest mode is covered.
--task digits: the shipped digits denoiser (`builtin:digits-denoiser`) on scikit-learn's 8x8 digits, scored
by Frechet distance and k-NN precision / recall in the feature space of the shipped digits classifier against
500 held-out digits; the noise-floor row is training digits against held-out ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import distill

ROOT = Path(__file__).resolve().parents[1]
BASES = {
    "gmm2d": {"task": "diffusion", "teacher": {"path": "builtin:gmm2d-teacher"},
              "data": {"builtin": "gmm2d", "modes": 8, "imbalance": 10.0},
              "eval": {"samples": 2000, "teacher_steps": [1, 2, 4, 8, 16, 32, 64]}},
    "digits": {"task": "diffusion", "teacher": {"path": "builtin:digits-denoiser"}, "data": {"builtin": "digits"},
               "eval": {"samples": 500, "teacher_steps": [1, 2, 4, 8, 16, 32, 64]}},
}
ARMS = {
    "dmd_reverse_kl": ({"method": "dmd", "eval_steps": [1]}, {"divergence": "reverse_kl"}, {"steps": 2000}),
    "dmd_forward_kl": ({"method": "dmd", "eval_steps": [1]}, {"divergence": "forward_kl"}, {"steps": 2000}),
    "dmd_js": ({"method": "dmd", "eval_steps": [1]}, {"divergence": "js"}, {"steps": 2000}),
    "consistency": ({"method": "consistency", "eval_steps": [1, 2, 4]}, {}, {"steps": 3000, "lr": 2e-4}),
    "progressive": ({"method": "progressive", "eval_steps": [1, 2, 4]}, {"start_steps": 64},
                    {"steps": 1000, "lr": 2e-4}),
}
PARTS = {"divergences": ["dmd_reverse_kl", "dmd_forward_kl", "dmd_js"],
         "methods": ["dmd_reverse_kl", "consistency", "progressive"]}
METRICS = {"gmm2d": ["modes_covered", "rarest_mode_mass", "tv", "precision", "mmd", "sliced_wasserstein"],
           "digits": ["fd", "precision", "recall"]}


def run(task: str, arm: str, seed: int, out: Path) -> dict:
    student, objective, train = ARMS[arm]
    base = BASES[task]
    run_dir = out / f"{arm}-seed{seed}"
    if not (run_dir / "results.json").is_file():  # finished runs are reused: the script resumes
        recipe = {**base, "name": f"{task}-{arm}-seed{seed}", "student": student, "objective": objective,
                  "train": {**train, "seed": seed}, "output": str(run_dir)}
        recipe["data"] = {**base["data"], "seed": seed}
        distill.run(recipe, overwrite=True)
    results = json.loads((run_dir / "results.json").read_text())
    return {**results["rows"], "train_seconds": results["train_seconds"]}


def show(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def table(task: str, rows_per_seed: list[dict], names: list[str], title: str) -> None:
    metrics, modes = METRICS[task], task == "gmm2d"
    print(f"\n{title}")
    print("| model | " + " | ".join(metrics) + (" | rarest mode covered |" if modes else " |"))
    print("|---|" + "---|" * (len(metrics) + modes))
    for name in names:
        rows = [r[name] for r in rows_per_seed if name in r]
        if not rows:
            continue
        line = f"| {name} | " + " | ".join(show([r[m] for r in rows]) for m in metrics) + " |"
        if modes:
            line += f" {sum(r['rarest_mode_mass'] >= 0.1 * r['rarest_mode_weight'] for r in rows)}/{len(rows)} |"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="gmm2d", choices=list(BASES))
    parser.add_argument("--parts", nargs="+", default=None, choices=list(PARTS),
                        help="default: every part on gmm2d, `methods` on digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="default: runs/diffusion (gmm2d), runs/diffusion-digits")
    parser.add_argument("--json", help="write every run's rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.parts or (list(PARTS) if args.task == "gmm2d" else ["methods"])
    out = (ROOT / (args.out or ("runs/diffusion" if args.task == "gmm2d" else f"runs/diffusion-{args.task}"))).resolve()
    arms = list(dict.fromkeys(arm for part in parts for arm in PARTS[part]))
    figures = {arm: [run(args.task, arm, seed, out) for seed in args.seeds] for arm in arms}
    first = figures[arms[0]]
    teacher_rows = [name for name in first[0] if name.startswith("teacher")] + ["data (noise floor)"]
    table(args.task, first, teacher_rows, f"teacher (Euler) and {'exact' if args.task == 'gmm2d' else 'training'} "
          f"data, seeds {args.seeds}, mean ± std")
    for arm in arms:
        names = [name for name in figures[arm][0] if name.startswith("student")]
        seconds = statistics.mean(r["train_seconds"] for r in figures[arm])
        table(args.task, figures[arm], names, f"{arm}: {seconds:.0f} s training per run")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
