"""Few-step students of a diffusion teacher on an imbalanced 8-mode ring (gmm2d) or on 8x8 digits, 3 seeds.

    python experiments/diffusion.py [--task gmm2d|digits] [--parts divergences methods] [--seeds 0 1 2]
                                    [--arms ARM ...] [--json FILE] [--plot FILE] [--samples FILE]

1. divergences: one-step DMD with reverse KL (plain DMD) vs forward KL vs Jensen-Shannon weighting
   (f-distill); mode coverage, the rarest mode's mass, MMD.
2. methods: DMD (1 step) vs consistency (1, 2, 4 steps) vs progressive (1, 2, 4 steps) against the
   teacher's Euler sampler at 1-64 steps.
Teacher: the shipped gmm2d denoiser (`builtin:gmm2d-teacher`; mixture: 8 modes, the commonest 10x the
rarest, radius 2, std 0.05). Every model samples 2,000 points from the same noise; the noise-floor row
is exact data against exact data. Seeds change the student's training randomness.
Prints mean ± std over seeds, and the share of seeds where the rarest mode is covered. On gmm2d the seed also
changes the evaluation noise and reference samples; on digits the held-out split and the evaluation noise stay
those of data seed 0 (the split the teacher was trained on), and the seed changes the student's training only.
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
# digits: fewer updates, as every update costs ~20x more (a 174k-parameter conv denoiser; DMD 0.75 s, consistency
# 0.23 s, progressive 0.17 s per update on one thread).
DIGITS_TRAIN = {"dmd_reverse_kl": {"steps": 1000}, "dmd_forward_kl": {"steps": 1000}, "dmd_js": {"steps": 1000},
                "consistency": {"steps": 2000}, "progressive": {"steps": 500}}
PARTS = {"divergences": ["dmd_reverse_kl", "dmd_forward_kl", "dmd_js"],
         "methods": ["dmd_reverse_kl", "consistency", "progressive"]}
METRICS = {"gmm2d": ["modes_covered", "rarest_mode_mass", "tv", "precision", "mmd", "sliced_wasserstein"],
           "digits": ["fd", "precision", "recall"]}


def run(task: str, arm: str, seed: int, out: Path) -> dict:
    student, objective, train = ARMS[arm]
    train = {**train, **(DIGITS_TRAIN[arm] if task == "digits" else {})}
    base = BASES[task]
    run_dir = out / f"{arm}-seed{seed}"
    if not (run_dir / "results.json").is_file():  # finished runs are reused: the script resumes
        recipe = {**base, "name": f"{task}-{arm}-seed{seed}", "student": student, "objective": objective,
                  "train": {**train, "seed": seed}, "output": str(run_dir)}
        if task == "gmm2d":  # digits keeps the held-out split its teacher was trained against (data seed 0)
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


def plot(task: str, figures: dict[str, list[dict]], path: Path) -> None:
    """The primary metric (mean ± std over seeds) against sampling steps: the teacher's Euler sampler, every
    student arm, and the noise floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "mmd" if task == "gmm2d" else "fd"
    figure, axis = plt.subplots(figsize=(6, 4))
    first = next(iter(figures.values()))
    series = {"teacher (Euler)": (first, "teacher")}
    series.update({arm: (rows, "student") for arm, rows in figures.items()})
    for label, (rows_per_seed, prefix) in series.items():
        names = [n for n in rows_per_seed[0] if n.startswith(prefix)]
        steps = [rows_per_seed[0][n]["function_evaluations"] for n in names]
        values = [[r[n][metric] for r in rows_per_seed] for n in names]
        order = sorted(range(len(steps)), key=steps.__getitem__)
        axis.errorbar([steps[i] for i in order], [statistics.mean(values[i]) for i in order],
                      yerr=[statistics.stdev(values[i]) if len(values[i]) > 1 else 0 for i in order],
                      marker="o", capsize=3, label=label)
    floor = statistics.mean(r["data (noise floor)"][metric] for r in first)
    axis.axhline(floor, color="gray", linestyle="--", label="data (noise floor)")
    axis.set_xscale("log", base=2)
    if floor > 0:
        axis.set_yscale("log")
    else:  # an unbiased MMD of exact data dips below 0: linear around 0, logarithmic above 1e-3
        axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_ylim(bottom=3 * floor)
    axis.set_xlabel("sampling steps (network evaluations)")
    axis.set_ylabel(f"{metric}, lower is better (mean ± std over {len(first)} seeds)")
    axis.set_title(f"{task}: students against the teacher at equal steps")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sample_grid(task: str, out: Path, seed: int, path: Path) -> None:
    """Samples of the teacher (4 and 64 Euler steps), each arm's saved student of `seed` and real data, from one
    noise draw, in the run reports' layout."""
    from distill.diffusion.data import diffusion_task
    from distill.diffusion.models import load_denoiser
    from distill.diffusion.figures import plot_samples
    from distill.diffusion.sampler import sample_ode
    from distill.diffusion.trainer import ConsistencyModel, Schedule, consistency_sample, one_step

    data = diffusion_task(task, **({k: v for k, v in BASES[task]["data"].items() if k != "builtin"}), seed=0)
    teacher, _ = load_denoiser(BASES[task]["teacher"]["path"], "teacher")
    schedule = Schedule(0.002, 40.0)
    z = torch.randn((36 if task == "digits" else 2000, *data.data_shape), generator=torch.Generator().manual_seed(seed))
    samples = {}
    with torch.no_grad():
        for steps in (4, 64):
            samples[f"teacher euler {steps}"] = sample_ode(teacher, z, schedule.sigmas(steps), "euler")
        for arm in ARMS:
            if not (out / f"{arm}-seed{seed}" / "student").is_dir():
                continue
            student, config = load_denoiser(str(out / f"{arm}-seed{seed}" / "student"), arm)
            if config["method"] == "dmd":
                samples[f"{arm} 1"] = one_step(student, z, schedule.sigma_max)
            if config["method"] == "consistency":  # one student samples at any step count
                for steps in (1, 4):
                    model = ConsistencyModel(student, config["consistency_sigma_min"])
                    samples[f"{arm} {steps}"] = consistency_sample(model, z, steps, schedule,
                                                                   torch.Generator().manual_seed(seed + 1))
            if config["method"] == "progressive":  # a student per round: student/ is the 1-step one
                samples[f"{arm} 1"] = sample_ode(student, z, schedule.sigmas(1), "ddim")
    samples["data"] = data.sample(len(z), torch.Generator().manual_seed(seed))
    plot_samples(samples, data, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="gmm2d", choices=list(BASES))
    parser.add_argument("--parts", nargs="+", default=None, choices=list(PARTS),
                        help="default: every part on gmm2d, `methods` on digits")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="only these arms of the parts (e.g. to split "
                        "the runs over two processes; a later call with all arms reuses finished runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="default: runs/diffusion (gmm2d), runs/diffusion-digits")
    parser.add_argument("--json", help="write every run's rows here")
    parser.add_argument("--plot", help="write the metric-against-steps plot here (PNG)")
    parser.add_argument("--samples", help="write samples of the teacher, seed 0's students and data here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.parts or (list(PARTS) if args.task == "gmm2d" else ["methods"])
    out = (ROOT / (args.out or ("runs/diffusion" if args.task == "gmm2d" else f"runs/diffusion-{args.task}"))).resolve()
    arms = [arm for arm in dict.fromkeys(arm for part in parts for arm in PARTS[part]) if arm in (args.arms or ARMS)]
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
    if args.plot:
        plot(args.task, figures, Path(args.plot))
    if args.samples:
        sample_grid(args.task, out, args.seeds[0], Path(args.samples))


if __name__ == "__main__":
    main()
