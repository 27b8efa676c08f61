"""Teacher-guided data selection on the oracle, where each row's usefulness is known.

    python experiments/selection.py --out DIR [--seeds 3] [--jobs 2] [--steps 400] [--json FILE]

The corpus: 2,000 rows, half sampled from the oracle language and half from a corrupted source
(another random HMM over the same symbols), each row's `source` recorded. Steps:
  1. reference: the demo student trained alone (hard labels) on the mixed corpus: MiniPLM's small
     reference model, and the "student" of divergence selection
  2. `distill select` with the oracle teacher: difference (MiniPLM) and divergence, each keeping half;
     difference with --temperature 1 (every row weighted)
  3. `distill sweep` over data.train (3 seeds, same steps): the mixed corpus, a random half, the
     oracle half (the selection a perfect judge would make), each selection; the weighted one with
     data.weights. Metric: the distilled student's exact forward KL to the oracle (lower is better).
Also printed: each selection's precision (the share of oracle rows kept, or of weight on them).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = ROOT / "distill" / "recipes" / "oracle-demo.yaml"


def write_corpus(out: Path, size: int) -> None:
    from distill.lm.tasks.oracle import SEQUENCE_LENGTH, HiddenMarkovOracle, OracleTask

    if (out / "mixed.jsonl").is_file():
        return
    real = [{**r, "source": "oracle"} for r in OracleTask().records(size // 2, 11, "train")]
    symbols = HiddenMarkovOracle(seed=123).sample(size - size // 2, SEQUENCE_LENGTH, seed=[11, 7])
    fake = [{"text": " ".join(f"w{s}" for s in row), "source": "corrupt"} for row in symbols]
    rows = real + fake
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, chosen: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in chosen))
    write("oracle_half.jsonl", [r for r in rows if r["source"] == "oracle"])
    write("random_half.jsonl", random.Random(1).sample(rows, size // 2))
    write("mixed.jsonl", rows)


def distill_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, cwd=ROOT)


def precision(directory: Path) -> float:
    import datasets

    rows = datasets.load_from_disk(str(directory))
    weights = rows["weight"]
    return sum(w for w, s in zip(weights, rows["source"]) if s == "oracle") / sum(weights)


def main() -> None:
    import yaml

    import distill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    write_corpus(out, args.size)
    recipe = yaml.safe_load(BASE.read_text())
    recipe["data"] = {"builtin": "oracle", "train": str(out / "mixed.jsonl"), "eval_size": 200}
    recipe["train"].update(steps=args.steps, threads=1, checkpoint_every=args.steps)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    reference = out / "reference"
    if not (reference / "results.json").is_file():
        distill_cli("run", str(out / "recipe.yaml"), "--set", f"output={reference}", "--overwrite")
    selections = {"difference": ["--method", "difference", "--keep", "0.5"],
                  "divergence": ["--method", "divergence", "--keep", "0.5"],
                  "weighted": ["--method", "difference", "--temperature", "1.0"]}
    for name, options in selections.items():
        if not (out / f"select_{name}" / "selection.json").is_file():
            distill_cli("select", str(out / "recipe.yaml"), "--reference", str(reference / "alone"),
                        "--out", str(out / f"select_{name}"), *options)
    report = {"precision": {name: precision(out / f"select_{name}") for name in selections}}
    print("precision (share of kept rows, or of weight, from the oracle):", report["precision"])
    common = dict(seeds=args.seeds, jobs=args.jobs, overrides=["train.baseline=false"],
                  progress=lambda line: print(line, flush=True))
    arms = [str(out / name) for name in ("mixed.jsonl", "random_half.jsonl", "oracle_half.jsonl",
                                         "select_difference", "select_divergence")]
    hard = distill.sweep(str(out / "recipe.yaml"), {"data.train": arms}, output=out / "sweep", **common)
    print(hard.table())
    soft = distill.sweep(str(out / "recipe.yaml"), {"data.train": [str(out / "select_weighted")]},
                         output=out / "sweep_weighted", **{**common, "overrides": [*common["overrides"],
                                                                                   "data.weights=weight"]})
    print(soft.table())
    report["sweep"] = json.loads((out / "sweep" / "summary.json").read_text())
    report["sweep_weighted"] = json.loads((out / "sweep_weighted" / "summary.json").read_text())
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
