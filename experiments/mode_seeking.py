"""Mode seeking vs mode covering on the oracle language: one student per objective and seed,
exact forward KL(oracle||student) and reverse KL(student||oracle) to the truth.

    python experiments/mode_seeking.py --seeds 0 1 2 --steps 400 --out runs/mode-seeking \
        [--objectives forward_kl reverse_kl ...] [--jobs 2] [--json FILE] [--plot docs/mode_seeking.png]

Every run is `distill run builtin:oracle-demo` with the objective swapped (no alone baseline;
the alone student is one extra run per seed, with objective kd_weight 0 / ce_weight 1), run as
`distill sweep` over objective.loss (seeds into train.seed and data.seed, as `distill demo --seed`). Known from
the literature: reverse KL is mode seeking (low reverse KL, higher forward KL), forward KL mode
covering; the table reports whatever this task shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OBJECTIVES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "ab_divergence",
              "adaptive_kl", "taid", "alone"]


def sweep_runs(objectives: list[str], seeds: list[int], steps: int, out: Path, jobs: int) -> list[dict]:
    """One `distill sweep` of builtin:oracle-demo over objective.loss (the alone arm: a second sweep with
    kd_weight 0 / ce_weight 1), seeds into train.seed and data.seed; finished runs are kept."""
    import distill

    common = dict(seeds=seeds, jobs=jobs, seed_fields=["train.seed", "data.seed"],
                  progress=lambda line: print(line, flush=True))
    overrides = [f"train.steps={steps}", "train.baseline=false", f"train.checkpoint_every={steps}",
                 f"eval.every={steps}", "eval.throughput_tokens=2"]
    results = []
    losses = [o for o in objectives if o != "alone"]
    sweeps = ([("objectives", {"objective.loss": losses}, overrides)] if losses else []) + (
        [("alone", {}, [*overrides, "objective.kd_weight=0", "objective.ce_weight=1"])] if "alone" in objectives else [])
    for name, grid, sets in sweeps:
        result = distill.sweep("builtin:oracle-demo", grid, output=out / name, overrides=sets, **common)
        print(result.table())
        for point in result.points:
            objective = point["point"].get("objective.loss", "alone")
            for seed, row in point["seeds"].items():
                results.append({"objective": objective, "seed": int(seed), "forward_kl": row["oracle_forward_kl"],
                                "reverse_kl": row["oracle_reverse_kl"], "nll": row["nll"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--out", default="runs/mode-seeking")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    results = sweep_runs(args.objectives, args.seeds, args.steps, Path(args.out), args.jobs)
    print(f"{args.steps} steps of batch 32 on 1000 oracle sequences; seeds {args.seeds}; mean ± half-range")
    print("| objective | KL(oracle‖student) | KL(student‖oracle) | nll |")
    print("|---|---|---|---|")
    summary = {}
    for objective in args.objectives:
        rows = [r for r in results if r["objective"] == objective]
        cells = []
        for key in ("forward_kl", "reverse_kl", "nll"):
            values = [r[key] for r in rows]
            cells.append(f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}")
        summary[objective] = {k: statistics.mean(r[k] for r in rows) for k in ("forward_kl", "reverse_kl", "nll")}
        print(f"| {objective} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4.5))
        for objective, means in summary.items():
            axis.scatter(means["forward_kl"], means["reverse_kl"])
            axis.annotate(objective, (means["forward_kl"], means["reverse_kl"]), fontsize=8)
        axis.set(xlabel="KL(oracle || student)  (mode covering: low)", ylabel="KL(student || oracle)  (mode seeking: low)",
                 title=f"objectives on the oracle task, mean of {len(args.seeds)} seeds")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
