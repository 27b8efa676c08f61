"""Preference distillation on arithmetic: which pair loss teaches the student the right sums? 3 seeds.

    python experiments/preference.py [--seeds 0 1 2] [--steps N] [--arms ...] [--out runs/preference] [--json FILE]

Pairs: chosen = the correct sum, rejected = a plausible wrong one (a dropped carry, or one digit off by one),
from `recipes/arithmetic-preference.yaml` (a 2-layer student built from teacher layers 0 and 3 of the shipped
teacher, 600 steps of 32 pairs, lr 1e-3). Arms (regime preference, same student init, data and steps):
  sft             the `alone` row: plain SFT on the chosen answers (from the dckd_sft run of each seed)
  dpo_sft         DPO (beta 0.1, reference = the initial student) + 0.5 SFT on the chosen
  dpo_teacher     DPO with the teacher as the reference (LLaVA-MoD) + 0.5 SFT on the chosen
  redi            REDI (alpha 0.8): length-normalised push-up of the chosen, push-down of the rejected
  dckd            DCKD: forward KL to the teacher on the tokens of both answers
  dckd_sft        DCKD + 0.5 SFT on the chosen (the shipped recipe)
  adpa_sft        ADPA on the student's samples (the shipped teacher's advantage over a 150-update checkpoint of
                  it) + 0.5 SFT on the chosen
  adpa_plus       ADPA+: the same, starting from the dckd_sft student (sequential, as the paper)
  warm_*          from the SFT student of each seed (the `alone` model of its dckd_sft run, exact match ~0.97),
                  WARM_STEPS more steps at lr WARM_LR (1e-5), as the preference papers start from an SFT model:
                  warm_dpo, warm_dpo_teacher, warm_redi, warm_dckd, and warm_adpa (ADPA with the per-token
                  advantage clipped to [-2, 2] + 0.5 SFT)
Metric: exact match of greedy answers on 200 held-out problems (the teacher scores 1.000). Prints mean ±
half-range per arm; each run is a normal run directory under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-preference.yaml"
ARMS = {  # arm -> (objective, regime.preference, train.baseline)
    "dpo_sft": ({"loss": "dpo", "beta": 0.1, "ce_weight": 0.5}, {"reference": "initial"}, False),
    "dpo_teacher": ({"loss": "dpo", "beta": 0.1, "ce_weight": 0.5}, {"reference": "teacher"}, False),
    "redi": ({"loss": "redi", "alpha": 0.8}, {}, False),
    "dckd": ({"loss": "dckd"}, {}, False),
    "dckd_sft": ({"loss": "dckd", "ce_weight": 0.5}, {}, True),  # its `alone` row is the sft arm
    # ADPA: the shipped teacher is the "aligned" one, its reference a weaker checkpoint (WEAK_STEPS updates of
    # `distill train-teacher builtin:arithmetic`); ADPA+ starts from the dckd_sft student of the same seed
    "adpa_sft": ({"loss": "adpa", "ce_weight": 0.5}, {"teacher_reference": "WEAK"}, False),
    "adpa_plus": ({"loss": "adpa", "ce_weight": 0.5}, {"teacher_reference": "WEAK"}, False),
}
# From the SFT student (issue 19): the same losses at a small lr
WARM = {"warm_dpo": "dpo_sft", "warm_dpo_teacher": "dpo_teacher", "warm_redi": "redi", "warm_dckd": "dckd"}
ARMS.update({name: ARMS[base] for name, base in WARM.items()})
ARMS["warm_adpa"] = ({"loss": "adpa", "ce_weight": 0.5, "advantage_clip": 2.0}, {"teacher_reference": "WEAK"}, False)
WARM_STEPS, WARM_LR = 200, 1e-5
WEAK_STEPS = 150


def weak_teacher(out: Path) -> Path:
    """The aligned teacher's "reference": the arithmetic teacher trained WEAK_STEPS updates only."""
    directory = out / f"arithmetic-teacher-{WEAK_STEPS}-steps"
    if not (directory / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "distill", "train-teacher", "builtin:arithmetic", "--out", str(directory),
                        "--steps", str(WEAK_STEPS), "--batch-size", "64", "--lr", "1e-3", "--threads", "1",
                        "--overwrite"], check=True, cwd=ROOT)
    return directory


def run(arm: str, seed: int, out: Path, steps: int | None) -> dict:
    run_dir = out / f"{arm}-seed{seed}"
    if not (run_dir / "results.json").is_file():
        recipe = yaml.safe_load(RECIPE.read_text())
        objective, preference, baseline = ARMS[arm]
        recipe["objective"] = objective
        if preference.get("teacher_reference") == "WEAK":
            preference = {**preference, "teacher_reference": str(weak_teacher(out))}
        recipe["regime"] = {"kind": "preference", **({"preference": preference} if preference else {})}
        if arm == "adpa_plus":  # ADPA+: from the DCKD student of this seed
            run("dckd_sft", seed, out, steps)
            recipe["student"] = {"path": str(out / f"dckd_sft-seed{seed}" / "student")}
            recipe["train"]["warmup_steps"] = 0
        recipe["train"].update(seed=seed, baseline=baseline, **({"steps": steps, "warmup_steps": 0} if steps else {}))
        if arm.startswith("warm_"):  # from the SFT student of this seed (the alone row of its dckd_sft run)
            run("dckd_sft", seed, out, steps)
            recipe["student"] = {"path": str(out / f"dckd_sft-seed{seed}" / "alone")}
            recipe["train"].update(steps=WARM_STEPS, warmup_steps=0, lr=WARM_LR)
        recipe["data"]["seed"] = seed
        recipe["output"] = str(run_dir)
        file = out / "recipes" / f"{arm}-seed{seed}.yaml"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        subprocess.run([sys.executable, "-m", "distill", "run", str(file), "--overwrite"], check=True, cwd=ROOT)
    return json.loads((run_dir / "results.json").read_text())["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick runs)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="runs/preference")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    figures: dict[str, list[float]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            rows = run(arm, seed, out, args.steps)
            figures.setdefault(arm, []).append(rows["distilled"]["exact_match"])
            if "alone" in rows:
                figures.setdefault("sft", []).append(rows["alone"]["exact_match"])
            if arm == args.arms[0]:
                figures.setdefault("teacher", []).append(rows["teacher"]["exact_match"])
    print(f"\narithmetic preference pairs, seeds {args.seeds}: exact match (mean ± half-range)")
    print("| arm | exact match | per seed |\n|---|---|---|")
    for arm in ["teacher", "sft", *args.arms]:
        values = figures.get(arm)
        if values:
            print(f"| {arm} | {statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f} | "
                  + ", ".join(f"{v:.3f}" for v in values) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
