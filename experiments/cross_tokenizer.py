"""Cross-tokenizer KD on the two-tokenizer oracle, 3 seeds: is a teacher that reads the language one way useful
to a student that reads it another, and which objective carries it best?

    python experiments/cross_tokenizer.py [--seeds 0 1 2] [--steps 300] [--out runs/cross-tokenizer] [--json FILE]

The teacher is the shipped oracle teacher (one token per symbol: `w17` is one token). The student reads the same
text `w3 w17 w5 ...` through a byte-level BPE trained on oracle samples (tokens are pieces of symbols, spaces and
runs of several symbols), and starts from random weights (seeded). Arms, at equal steps and data:
  alone          CE on the student's own tokens (the `alone` row of the alm run)
  uld            CE + ULD (sorted-probability L1 at paired completion positions)
  gold_hybrid    CE + GOLD's hybrid (JSD on entries whose strings match, ULD on the rest, per aligned chunk)
  alm            CE + ALM (binarised KL of aligned chunk likelihoods, tau 100)
  alm_tau1       CE + ALM with tau 1 (no outcome sharpening)
  alm_x10        CE + 10 ALM (tokenkit balances the two by gradient magnitude; at tau 100 ALM's is small)
  alm_unbiased   CE + ALM with tokenkit's debiasing and chunk merging at boundary probability 0.1
  same_tokenizer the reference: a student of the same shape on the teacher's tokenizer, forward KL
Metric: the exact-likelihood estimate of KL(oracle || student) per symbol on 200 held-out oracle sequences
(log p_oracle(x) by the forward algorithm, log q(tok(x)) of the student's canonical tokenization; an upper bound
of the KL to the student's marginal over tokenizations). Each run is a normal run directory under --out.
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
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
ARMS = {"uld": {"loss": "uld"}, "gold_hybrid": {"loss": "gold_hybrid"}, "alm": {"loss": "alm"},
        "alm_tau1": {"loss": "alm", "tau": 1.0}, "alm_x10": {"loss": "alm", "kd_weight": 10.0},
        "alm_unbiased": {"loss": "alm", "debias": True, "merge_threshold": 0.1},
        "same_tokenizer": {"loss": "forward_kl"}}


def make_student(directory: Path, seed: int) -> None:
    """A randomly initialised student (seeded) with the oracle's BPE tokenizer, saved."""
    if (directory / "config.json").is_file():
        return
    from distill.lm.tasks.oracle import OracleTask
    from distill.lm.tokenizer_zoo import tiny_causal_lm

    tokenizer = OracleTask().student_tokenizer(vocab_size=400)
    model = tiny_causal_lm(tokenizer, hidden_size=SHAPE["hidden_size"], num_hidden_layers=SHAPE["num_hidden_layers"],
                           seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def recipe(arm: str, seed: int, steps: int, student_dir: Path, out: Path) -> dict:
    objective = {**ARMS[arm], "ce_weight": 0.0 if arm == "same_tokenizer" else 1.0}
    student = {"config": SHAPE} if arm == "same_tokenizer" else {"path": str(student_dir)}
    return {"name": f"cross-{arm}-seed{seed}", "teacher": {"path": "builtin:oracle-teacher"}, "student": student,
            "data": {"builtin": "oracle", "train_size": 1000, "eval_size": 200, "seed": 0},
            "objective": objective, "regime": {"kind": "off_policy"},
            "train": {"steps": steps, "batch_size": 32, "lr": 3.0e-3, "warmup_steps": min(30, steps // 10), "seed": seed, "threads": 1,
                      "checkpoint_every": steps, "baseline": arm == "alm"},
            "eval": {"every": steps, "batch_size": 64, "generate_size": 0, "throughput_tokens": 4},
            "output": str(out)}


def per_symbol(run_dir: Path, row_dir: str) -> dict:
    """The per-symbol metrics of a saved model on the run's eval sequences (the same 200 for every run)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.tasks.oracle import OracleTask

    torch.set_num_threads(1)
    task = OracleTask()
    records = task.records(200, 0, "eval")
    symbols = np.array([[int(w[1:]) for w in r["text"].split()] for r in records])
    model = AutoModelForCausalLM.from_pretrained(run_dir / row_dir).eval()
    return task.per_symbol_metrics(model, AutoTokenizer.from_pretrained(run_dir / row_dir), symbols, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", default="runs/cross-tokenizer")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="Write a bar chart of the arms (mean and each seed) here.")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        student_dir = out / f"student-seed{seed}"
        make_student(student_dir, seed)
        for arm in args.arms:
            run_dir = out / f"{arm}-seed{seed}"
            if not (run_dir / "results.json").is_file():
                recipe_file = out / "recipes" / f"{arm}-seed{seed}.yaml"
                recipe_file.parent.mkdir(parents=True, exist_ok=True)
                recipe_file.write_text(yaml.safe_dump(recipe(arm, seed, args.steps, student_dir, run_dir)))
                subprocess.run([sys.executable, "-m", "distill", "run", str(recipe_file)], check=True,
                               stdout=subprocess.DEVNULL)
            results.setdefault(arm, []).append(per_symbol(run_dir, "student")["oracle_kl_per_symbol"])
            if arm == "alm":
                results.setdefault("alone", []).append(per_symbol(run_dir, "alone")["oracle_kl_per_symbol"])
            if seed == args.seeds[0] and arm == args.arms[0]:
                teacher = json.loads((run_dir / "results.json").read_text())["rows"]["teacher"]
                results["teacher"] = [teacher.get("oracle_kl_per_symbol", float("nan"))]
    print(f"\n{'arm':16} {'KL(oracle||model) per symbol':>30}  seeds")
    for arm, values in results.items():
        mean = statistics.mean(values)
        half = (max(values) - min(values)) / 2
        print(f"{arm:16} {mean:22.4f} ± {half:.4f}  {', '.join(f'{v:.4f}' for v in values)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [arm for arm in ("teacher", "same_tokenizer", "alone", "alm", "alm_tau1", "alm_x10", "alm_unbiased",
                             "gold_hybrid", "uld")
             if arm in results]
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    for x, arm in enumerate(order):
        values = results[arm]
        axis.bar(x, statistics.mean(values), color="#8fb3d9" if arm not in ("teacher", "same_tokenizer") else "#cccccc")
        axis.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    axis.set_xticks(range(len(order)), order, rotation=20)
    axis.set_ylabel("KL(oracle || model) per symbol")
    axis.set_title("two-tokenizer oracle: BPE student, one-token-per-symbol teacher (3 seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
