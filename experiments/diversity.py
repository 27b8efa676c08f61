"""Does the teacher's first step restore the diversity a few-step student lost? On gmm2d (8 modes,
the rarest 10x rarer than the commonest), where modes are countable.

    python experiments/diversity.py --out DIR [--seeds 3] [--jobs 2] [--json FILE]

`distill sweep` of recipes/gmm2d-dmd.yaml over objective.divergence in {reverse_kl (plain DMD, mode
seeking), js}, and of recipes/gmm2d-consistency.yaml and gmm2d-progressive.yaml, x 3 seeds, each
scored with eval.hybrid [2, 4, 8, 16]: every student row (`student dmd 1`, `student consistency 2`,
...) against the hybrid sampler (`hybrid-N <method> <steps>`: the teacher's first Euler step of an
N-step schedule, then the student's steps; one more network call). Metrics per row: modes covered
(of 8) and the rarest mode's mass (truth: 0.0302), 95% t intervals over seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYBRID = [2, 4, 8, 16]


def rows_of(result) -> list[str]:
    """The rows to report: each student row and its hybrids, and the teacher at 8 and 64 steps."""
    names = list(dict.fromkeys(name for point in result.points for rows in point["all_rows"].values() for name in rows))
    students = [n for n in names if n.startswith("student ")]
    ordered = []
    for student in students:
        how = student.split(" ", 1)[1]
        ordered += [student, *(f"hybrid-{n} {how}" for n in HYBRID if f"hybrid-{n} {how}" in names)]
    return ordered + [n for n in ("teacher euler 8", "teacher euler 64") if n in names]


def main() -> None:
    import distill
    from distill.core.stats import interval

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["dmd", "consistency", "progressive"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = {}
    print("| student | row | NFE | modes covered | rarest mode mass | mmd |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        grid = {"objective.divergence": ["reverse_kl", "js"]} if method == "dmd" else {}
        result = distill.sweep(str(ROOT / "recipes" / f"gmm2d-{method}.yaml"), grid, seeds=args.seeds, jobs=args.jobs,
                               output=args.out.resolve() if method == "dmd" else args.out.resolve() / method,
                               overrides=["train.threads=1", f"eval.hybrid={json.dumps(HYBRID)}"],
                               progress=lambda line: print(line, flush=True))
        for point in result.points:
            label = f"{method} {point['point'].get('objective.divergence', '')}".strip()
            for row in rows_of(result):
                values = [rows[row] for rows in point["all_rows"].values() if row in rows]
                if not values:
                    continue
                cells = {}
                for metric in ("modes_covered", "rarest_mode_mass", "mmd"):
                    spread = interval([v[metric] for v in values])
                    cells[metric] = {"mean": spread.mean, "low": spread.low, "high": spread.high, "n": spread.n}
                table.setdefault(label, {})[row] = cells
                text = " | ".join(f"{c['mean']:.4g} [{c['low']:.3g}, {c['high']:.3g}]" for c in cells.values())
                print(f"| {label} | {row} | {values[0]['function_evaluations']} | {text} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
