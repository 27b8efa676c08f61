"""Teacher hacking (Tiapkin et al. 2025) on the oracle language: does a student trained long on a small
fixed dataset keep getting closer to its teacher (the proxy) while moving away from the true language
(the truth)? And do fresh sequences each step prevent it?

    python experiments/teacher_hacking.py [--seeds 0 1 2] [--steps 1000] [--small 64] [--json FILE] [--plot PNG]

The oracle is a known hidden Markov language, the teacher a transformer trained on its samples
(imperfect: KL(oracle||teacher) ~0.03 nats/token), the student a smaller transformer distilled from the
teacher with forward KL at equal steps and batch. Arms:
  offline_small          off-policy on a fixed set of --small oracle sequences (hundreds of epochs)
  offline_teacher_small  the same size, the teacher's own samples (sequence KD at temperature 1, fixed)
  fresh                  off-policy, steps x batch oracle sequences: every sequence is seen once
  online_student         on-policy (lmbda 1): the student samples fresh sequences every step

Every eval point records on held-out oracle sequences: the proxy, KL(teacher||student) per token
(`teacher_kl`), and the truth, the exact KL(oracle||student) per token (`oracle_forward_kl`). The
training loss (KL on the batches trained on) is the proxy the optimiser sees. The plot shows the three
against steps, mean over seeds with the min-max band.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from regimes import BASE, ROOT, run_recipe

ARMS = {  # regime, train_size (None: steps x batch)
    "offline_small": ({"kind": "off_policy"}, "small"),
    "offline_teacher_small": ({"kind": "sequence", "sample_temperature": 1.0}, "small"),
    "fresh": ({"kind": "off_policy"}, None),
    "online_student": ({"kind": "on_policy", "lmbda": 1.0}, "small"),
}
BATCH = 32


def run(arm: str, seed: int, args, out: Path) -> dict:
    regime, size = ARMS[arm]
    recipe = yaml.safe_load(BASE["oracle"].read_text())
    recipe["objective"] = {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0}
    recipe["regime"] = regime
    recipe["data"].update(seed=seed, train_size=args.small if size == "small" else args.steps * BATCH)
    recipe["train"].update(seed=seed, steps=args.steps, batch_size=BATCH, baseline=False,
                           checkpoint_every=args.steps, warmup_steps=min(50, args.steps // 10))
    recipe["eval"].update(every=args.every)
    run_dir = out / f"{arm}-seed{seed}"
    run_recipe(recipe, run_dir, out / "recipes" / f"{arm}-seed{seed}.yaml")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    teacher = json.loads((run_dir / "results.json").read_text())["rows"]["teacher"]
    return {"steps": [e["step"] for e in evals], "teacher_kl": [e["teacher_kl"] for e in evals],
            "oracle_forward_kl": [e["oracle_forward_kl"] for e in evals],
            "train_steps": [r["step"] for r in losses if "kd" in r], "train_kl": [r["kd"] for r in losses if "kd" in r],
            "teacher_oracle_forward_kl": teacher["oracle_forward_kl"]}


def _band(runs: list[dict], key: str):
    columns = list(zip(*[r[key] for r in runs]))
    return [statistics.mean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_kl", "train_steps", "proxy on the training batches\nKL(teacher||student)"),
              ("teacher_kl", "steps", "proxy, held-out\nKL(teacher||student)"),
              ("oracle_forward_kl", "steps", "truth, held-out\nKL(oracle||student)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (key, x_key, title) in zip(axes, panels):
        for arm, runs in figures.items():
            mean, low, high = _band(runs, key)
            steps = runs[0][x_key]
            (line,) = axis.plot(steps, mean, label=arm)
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        if key == "oracle_forward_kl":
            teacher = statistics.mean(r["teacher_oracle_forward_kl"] for runs in figures.values() for r in runs)
            axis.axhline(teacher, color="black", linestyle=":", label="teacher")
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="eval every this many steps")
    parser.add_argument("--small", type=int, default=64, help="sequences in the fixed small dataset")
    parser.add_argument("--out", default="runs/teacher-hacking")
    parser.add_argument("--json", help="write every run's curves here")
    parser.add_argument("--plot", default="docs/teacher_hacking.png")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    figures = {arm: [run(arm, seed, args, out) for seed in args.seeds] for arm in args.arms}
    print(f"\nseeds {args.seeds}, {args.steps} steps x {BATCH} sequences; mean ± half-range")
    print("| arm | proxy KL(T‖S) at best truth | truth KL(oracle‖S), best (step) | truth at the end | "
          "proxy at the end | truth rise from best |")
    print("|---|---|---|---|---|---|")
    for arm, runs in figures.items():
        cells = {"proxy_at_best": [], "best": [], "end": [], "proxy_end": [], "rise": [], "best_step": []}
        for r in runs:
            best = min(range(len(r["steps"])), key=lambda i: r["oracle_forward_kl"][i])
            cells["proxy_at_best"].append(r["teacher_kl"][best])
            cells["best"].append(r["oracle_forward_kl"][best])
            cells["best_step"].append(r["steps"][best])
            cells["end"].append(r["oracle_forward_kl"][-1])
            cells["proxy_end"].append(r["teacher_kl"][-1])
            cells["rise"].append(r["oracle_forward_kl"][-1] - r["oracle_forward_kl"][best])

        def show(values: list[float]) -> str:
            return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"

        print(f"| {arm} | {show(cells['proxy_at_best'])} | {show(cells['best'])} ({cells['best_step']}) | "
              f"{show(cells['end'])} | {show(cells['proxy_end'])} | {show(cells['rise'])} |")
    teacher = statistics.mean(r["teacher_oracle_forward_kl"] for runs in figures.values() for r in runs)
    print(f"teacher KL(oracle‖T) = {teacher:.4f}")
    if args.plot:
        plot(figures, ROOT / args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
