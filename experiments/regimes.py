"""Which sequences should the student learn on? Every regime at equal student updates, 3 seeds.

    python experiments/regimes.py [--tasks arithmetic oracle] [--seeds 0 1 2] [--steps N] [--json FILE]

Arms (same student, init, data, steps and batch; objective JSD(0.5) for the logit regimes, as GKD):
  off_policy            the data's completions, live teacher
  on_policy_0.5 / _1    GKD: a micro-batch is the student's samples with probability 0.5 / 1
  sequence              the teacher's greedy completions, learned with JSD + 0.5 CE
  sequence_t1           the same with completions sampled from the teacher at temperature 1
  self                  OPSD: the student shown the answer is the teacher (arithmetic only)
  opd_1 / opd_1.25      on-policy distillation as RL, reward scale 1 (reverse KL) / 1.25 (ExOPD)
  opd_reward            scale 1 + correctness reward, 4 samples a problem (KD + RL; arithmetic only)
  opd_clip              scale 1, token reward clipped to [-2, 2] and centred on the micro-batch mean
  opd_gate              opd_clip + samples the teacher scores below -3 nats/token dropped (arithmetic only)
  opd_k2 / opd_k3       scale 1, the token reward as Schulman's k2 / k3 KL estimator instead of k1
  warm_*                off_policy / opd_1 / opd_reward for 300 more steps, starting from the off_policy
                        student of the same seed (the OPD papers start from a trained student; arithmetic only)

Metrics: arithmetic, exact match of greedy answers on 200 held-out problems; oracle, the exact
forward and reverse KL of the student to the true language. Prints mean ± half-range per arm;
each run is a normal run directory under --out (report.html, losses.jsonl with step timings).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = {"arithmetic": ROOT / "recipes" / "arithmetic.yaml", "oracle": ROOT / "distill" / "recipes" / "oracle-demo.yaml"}
JSD = {"loss": "jsd", "beta": 0.5, "kd_weight": 1.0, "ce_weight": 0.0}
ARMS = {  # (objective, regime)
    "off_policy": (JSD, {"kind": "off_policy"}),
    "on_policy_0.5": (JSD, {"kind": "on_policy", "lmbda": 0.5}),
    "on_policy_1": (JSD, {"kind": "on_policy", "lmbda": 1.0}),
    "sequence": ({**JSD, "ce_weight": 0.5}, {"kind": "sequence", "sample_temperature": 0.0}),
    "sequence_t1": ({**JSD, "ce_weight": 0.5}, {"kind": "sequence", "sample_temperature": 1.0}),
    "self": (JSD, {"kind": "self", "privileged_field": "completion"}),
    "opd_1": (JSD, {"kind": "opd", "scale": 1.0}),
    "opd_1.25": (JSD, {"kind": "opd", "scale": 1.25}),
    "opd_reward": (JSD, {"kind": "opd", "scale": 1.0, "reward": "builtin", "reward_weight": 0.5, "group_size": 4}),
    # issue 19: the token reward clipped to [-2, 2] and centred on the micro-batch mean; then also a quality gate
    # dropping samples whose mean teacher log-prob per token is below -3
    "opd_clip": (JSD, {"kind": "opd", "scale": 1.0, "opd": {"reward_clip": 2.0, "baseline": "batch"}}),
    "opd_gate": (JSD, {"kind": "opd", "scale": 1.0, "opd": {"reward_clip": 2.0, "baseline": "batch", "gate": -3.0}}),
    # Schulman's k3 estimator as the token reward (lower variance, biased; KDRL compares k1/k2/k3)
    "opd_k3": (JSD, {"kind": "opd", "scale": 1.0, "opd": {"estimator": "k3"}}),
    "opd_k2": (JSD, {"kind": "opd", "scale": 1.0, "opd": {"estimator": "k2"}}),
}
# Warm start: the same student after its off_policy run (same seed), trained WARM_STEPS more steps.
WARM = {"warm_off_policy": "off_policy", "warm_opd_1": "opd_1", "warm_opd_reward": "opd_reward",
        "warm_opd_clip": "opd_clip", "warm_opd_gate": "opd_gate"}
WARM_STEPS = 300
ARMS.update({name: ARMS[base] for name, base in WARM.items()})
ONLY_ARITHMETIC = {"self", "opd_reward", "opd_gate", *WARM}  # the oracle language has no prompts, answers or rewards
METRICS = {"arithmetic": ["exact_match"], "oracle": ["oracle_forward_kl", "oracle_reverse_kl"]}


def run_recipe(recipe: dict, run_dir: Path, recipe_file: Path) -> None:
    """`distill run` the recipe into run_dir unless a finished run is there (so the scripts resume)."""
    if (run_dir / "results.json").is_file():
        return
    recipe["output"] = str(run_dir)
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distill", "run", str(recipe_file), "--overwrite"], check=True, cwd=ROOT)
    print(f"{run_dir.name}: {time.perf_counter() - started:.0f} s", flush=True)


def run_arm(task: str, arm: str, seed: int, out: Path, steps: int | None) -> dict:
    run_dir = out / f"{task}-{arm}-seed{seed}"
    recipe = yaml.safe_load(BASE[task].read_text())
    recipe["objective"], recipe["regime"] = ARMS[arm]
    recipe["train"].update(seed=seed, baseline=False, **({"steps": steps} if steps else {}))
    recipe["data"]["seed"] = seed
    if arm in WARM:  # continue from the off_policy student of this seed (run it first)
        start = run_dir.parent / f"{task}-off_policy-seed{seed}" / "student"
        if not start.is_dir():
            run_arm(task, "off_policy", seed, out, steps)
        recipe["student"] = {"path": str(start)}
        recipe["train"].update(steps=WARM_STEPS, warmup_steps=0)
    run_recipe(recipe, run_dir, out / "recipes" / f"{task}-{arm}-seed{seed}.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    generated = [r for r in losses if r.get("generate_seconds")]
    row = {metric: results["rows"]["distilled"][metric] for metric in METRICS[task]}
    row["teacher"] = {metric: results["rows"]["teacher"][metric] for metric in METRICS[task]}
    row["seconds"] = results.get("meta", results)["seconds"]  # (results.json keeps it under meta now)
    if generated:
        row["generation_tokens_per_second"] = statistics.median(r["generated_tokens"] / r["generate_seconds"]
                                                                for r in generated)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["arithmetic", "oracle"], choices=list(BASE))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick runs)")
    parser.add_argument("--out", default="runs/regimes")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    figures: dict = {}
    for task in args.tasks:
        for arm in args.arms:
            if task != "arithmetic" and arm in ONLY_ARITHMETIC:
                continue
            figures.setdefault(task, {})[arm] = [run_arm(task, arm, seed, out, args.steps) for seed in args.seeds]
    for task, arms in figures.items():
        metrics = METRICS[task]
        print(f"\n{task}, seeds {args.seeds} (mean ± half-range)")
        print("| arm | " + " | ".join(metrics) + " | seconds | sampling tok/s |")
        print("|---|" + "---|" * (len(metrics) + 2))
        for arm, rows in arms.items():
            cells = []
            for metric in metrics + ["seconds"]:
                values = [r[metric] for r in rows]
                cells.append(f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}")
            speeds = [r["generation_tokens_per_second"] for r in rows if "generation_tokens_per_second" in r]
            cells.append(f"{statistics.mean(speeds):,.0f}" if speeds else "-")
            print(f"| {arm} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
