"""Does OPD learn from an SFT student, which of its options help, and does offline OPD (Lightning) match online
OPD at equal teacher calls? Arithmetic, exact match, 3 seeds.

    python experiments/opd_fixes.py [--seeds 0 1 2] [--arms ...] [--out runs/opd-fixes] [--json FILE]

Each seed first trains an SFT student: the arithmetic recipe's 2-layer student (teacher layers 0 and 3),
off-policy JSD(0.5) from the shipped teacher for SFT_STEPS (450) steps at lr 1e-3: a partly trained student with
room to improve (exact match 0.83 on seed 0; this student stays at 0 until step ~300, then jumps, and at 150 or
330 steps it is still at 0), fine-tuned on the teacher that then scores it (Lightning OPD's teacher consistency
holds). Every arm
continues that student for STEPS steps of 32 samples at lr 1e-4 (20 warm-up steps; at 1e-3 OPD destroyed a
trained student, docs/experiments.md):

  sft_more            off-policy JSD, as the SFT stage (the data's answers, the whole teacher distribution)
  opd                 online OPD, k1 reward (the exact reverse-KL gradient), temperature 1
  opd_k3              online OPD, k3 reward (Schulman's low-variance estimator)
  opd_t07             online OPD sampling at temperature 0.7
  opd_clip            online OPD, token reward clipped to [-2, 2] and centred on the micro-batch mean
  opd_gate            opd_clip + samples the teacher scores below -3 nats/token dropped (the fixed baseline)
  opd_equal_calls     online OPD for EQUAL_STEPS steps: as many teacher-scored samples as offline OPD's
  offline             Lightning OPD: the SFT student's samples of the 2000 training prompts drawn once
                      (`distill rollouts`), scored once (`distill cache`), then STEPS steps from them with the
                      importance ratio clipped at 0.2 (`regime.opd.ratio_clip`); no teacher during training
  offline_noclip      the same without the ratio clip

Teacher calls = sequences the teacher scored: online, steps x 32; offline, the 2000 rollouts once.
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
BASE = ROOT / "recipes" / "arithmetic.yaml"
JSD = {"loss": "jsd", "beta": 0.5, "kd_weight": 1.0, "ce_weight": 0.0}
SFT_STEPS, STEPS, BATCH, TRAIN_SIZE = 450, 200, 32, 2000
EQUAL_STEPS = TRAIN_SIZE // BATCH  # 62 steps x 32 samples ~ the 2000 rollouts offline OPD scores once
CLIP = {"reward_clip": 2.0, "baseline": "batch"}
ARMS = {  # regime, steps
    "sft_more": ({"kind": "off_policy"}, STEPS),
    "opd": ({"kind": "opd"}, STEPS),
    "opd_k3": ({"kind": "opd", "opd": {"estimator": "k3"}}, STEPS),
    "opd_t07": ({"kind": "opd", "sample_temperature": 0.7}, STEPS),
    "opd_clip": ({"kind": "opd", "opd": CLIP}, STEPS),
    "opd_gate": ({"kind": "opd", "opd": {**CLIP, "gate": -3.0}}, STEPS),
    "opd_equal_calls": ({"kind": "opd"}, EQUAL_STEPS),
    "offline": ({"kind": "opd", "opd": {"ratio_clip": 0.2}}, STEPS),
    "offline_noclip": ({"kind": "opd"}, STEPS),
}
OFFLINE = {"offline", "offline_noclip"}


def distill(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, cwd=ROOT)


def base_recipe(seed: int) -> dict:
    recipe = yaml.safe_load(BASE.read_text())
    recipe["objective"] = dict(JSD)
    recipe["data"].update(seed=seed, train_size=TRAIN_SIZE)
    recipe["train"].update(seed=seed, baseline=False)
    return recipe


def sft(seed: int, out: Path) -> Path:
    run_dir = out / f"sft-seed{seed}"
    if not (run_dir / "results.json").is_file():
        recipe = base_recipe(seed)
        recipe["train"].update(steps=SFT_STEPS)
        recipe["eval"]["every"] = SFT_STEPS
        recipe["output"] = str(run_dir)
        file = out / "recipes" / f"sft-seed{seed}.yaml"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        distill("run", str(file), "--overwrite")
    return run_dir


def arm(name: str, seed: int, out: Path) -> dict:
    start = sft(seed, out)
    run_dir = out / f"{name}-seed{seed}"
    regime, steps = ARMS[name]
    recipe = base_recipe(seed)
    recipe["student"] = {"path": str(start / "student")}
    recipe["regime"] = json.loads(json.dumps(regime))
    recipe["train"].update(steps=steps, lr=1e-4, warmup_steps=20, checkpoint_every=steps)
    recipe["eval"]["every"] = steps
    recipe["output"] = str(run_dir)
    if name in OFFLINE:  # the SFT student's samples and the teacher's scores of them, shared by both offline arms
        recipe["regime"].update(rollouts=str(out / f"rollouts-seed{seed}"), path=str(out / f"rollouts-cache-seed{seed}"))
    file = out / "recipes" / f"{name}-seed{seed}.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    if not (run_dir / "results.json").is_file():
        if name in OFFLINE:
            distill("rollouts", str(file))
            distill("cache", str(file))
        distill("run", str(file), "--overwrite")
    results = json.loads((run_dir / "results.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    distilled = [r for r in losses if r.get("phase") == "distilled"]
    return {"exact_match": results["rows"]["distilled"]["exact_match"],
            "start": json.loads((start / "results.json").read_text())["rows"]["distilled"]["exact_match"],
            "teacher_calls": TRAIN_SIZE if name in OFFLINE else steps * BATCH,
            "first_kd": distilled[0].get("kd") if distilled else None,
            "last_kd": distilled[-1].get("kd") if distilled else None,
            "clipped_last": distilled[-1].get("clipped") if distilled else None,
            "seconds": results["meta"]["seconds"], "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/opd-fixes")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    figures = {name: [arm(name, seed, out) for seed in args.seeds] for name in args.arms}
    print(f"\nSFT students (start), per seed: {[r['start'] for r in figures[args.arms[0]]]}")
    print("| arm | exact match | per seed | teacher calls | reverse-KL estimate first / last log | seconds |")
    print("|---|---|---|---|---|---|")
    for name, rows in figures.items():
        values = [r["exact_match"] for r in rows]
        kd = " / ".join(f"{r['first_kd']:.2f}→{r['last_kd']:.2f}" if r["first_kd"] is not None else "-" for r in rows)
        print(f"| {name} | {statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in values)} | {rows[0]['teacher_calls']:,} | {kd} | "
              f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
