"""Differentially private students (train.privacy, DP-SGD through opacus): what privacy costs.

    python experiments/privacy.py --out DIR [--seeds 3] [--jobs 2] [--json FILE] [--families classifier lm]

classifier  digits, an MLP student (64 hidden), CE + Hinton KD (T = 4) from the shipped teacher, 30 epochs;
            `distill sweep` over train.privacy.epsilon in {0.5, 2, 8}, and the same recipe without privacy;
            rows distilled (KD) and alone (CE), 95% t intervals over 3 seeds
lm          the oracle demo (400 steps, forward KL), DP at epsilon 8 against no privacy, off-policy and
            DP-OPD (regime opd: only the student's training is private)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSIFIER = {"name": "digits-dp", "task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
              "student": {"arch": "mlp", "options": {"hidden": [64]}},
              "data": {"builtin": "digits", "eval_size": 300},
              "objective": {"terms": [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "temperature": 4, "weight": 0.5}]},
              "train": {"epochs": 30, "batch_size": 64, "lr": 0.01, "log_every": 50, "threads": 1}}
PRIVACY = {"max_grad_norm": 1.0, "delta": 1e-5}


def main() -> None:
    import distill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["classifier", "lm"])
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {}

    def sweep(name, recipe, grid, overrides=()):
        result = distill.sweep(recipe, grid, seeds=args.seeds, jobs=args.jobs, output=out / name,
                               overrides=list(overrides), progress=lambda line: print(line, flush=True))
        print(result.table())
        report[name] = json.loads((out / name / "summary.json").read_text())

    if "classifier" in args.families:
        private = {**CLASSIFIER, "train": {**CLASSIFIER["train"], "privacy": {**PRIVACY, "epsilon": 1.0}}}
        sweep("classifier_private", private, {"train.privacy.epsilon": [0.5, 2.0, 8.0]})
        sweep("classifier_public", CLASSIFIER, {})
    if "lm" in args.families:
        recipe = yaml.safe_load((ROOT / "distill" / "recipes" / "oracle-demo.yaml").read_text())
        recipe["train"].update(steps=args.lm_steps, threads=1, checkpoint_every=args.lm_steps)
        recipe["eval"]["every"] = args.lm_steps
        regimes = [{"kind": "off_policy"}, {"kind": "opd", "scale": 1.0}]
        sweep("lm_private", {**recipe, "train": {**recipe["train"], "privacy": {**PRIVACY, "epsilon": 8.0}}},
              {"regime": regimes})
        sweep("lm_public", recipe, {"regime": regimes})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
