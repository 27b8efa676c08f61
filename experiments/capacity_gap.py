"""Is a bigger teacher always better? The capacity gap on the oracle language, as sweeps.

    python experiments/capacity_gap.py --out DIR [--stages teachers teacher_axis chain student_axis]
                                       [--seeds 3] [--jobs 2] [--teacher-steps 1500] [--steps 400] [--json FILE]

Stages (each resumable: finished teachers and runs are skipped):
  teachers       six oracle teachers of widths 48..256 (4 layers, 0.15M-4.2M parameters), each trained
                 by `distill train-teacher builtin:oracle --config ...` for the same number of steps
  teacher_axis   one fixed student (the demo's: width 64, 2 layers) distilled from each teacher with
                 forward KL, 3 seeds: `distill sweep` over teacher.path; the metric is the student's
                 exact forward KL to the oracle (lower is better)
  chain          teaching-assistant chains from the biggest teacher: `assistants:` of one TA of each
                 smaller width, the same student at the end (`distill sweep` over assistants), against
                 distilling from the biggest teacher directly
  student_axis   students of widths 32..192 distilled from the shipped 1M teacher, each with its
                 `alone` row (same data, hard labels): does KD help small or big students more?
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTHS = [48, 64, 96, 128, 192, 256]  # 4 layers, intermediate 4x: 0.15M, 0.26M, 0.59M, 1.05M, 2.36M, 4.2M
STUDENT_WIDTHS = [32, 64, 128, 192]
BASE = ROOT / "distill" / "recipes" / "oracle-demo.yaml"


def teacher_dir(out: Path, width: int) -> Path:
    return out / "teachers" / f"h{width}"


def train_teachers(out: Path, steps: int, jobs: int) -> None:
    def train(width: int) -> None:
        target = teacher_dir(out, width)
        if (target / "teacher_card.json").is_file():
            return
        config = json.dumps({"hidden_size": width, "num_hidden_layers": 4, "num_attention_heads": 4,
                             "intermediate_size": 4 * width})
        log = out / "teachers" / f"h{width}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as file:
            subprocess.run([sys.executable, "-m", "distill", "train-teacher", "builtin:oracle", "--out", str(target),
                            "--config", config, "--steps", str(steps), "--threads", "1", "--resume"],
                           check=True, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT)
        print(f"teacher h{width}: {json.loads((target / 'teacher_card.json').read_text())['metrics']}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:  # each teacher in its own process with one thread
        list(pool.map(train, sorted(WIDTHS, reverse=True)))  # the longest first


def teacher_table(out: Path) -> list[dict]:
    rows = []
    for width in WIDTHS:
        card = json.loads((teacher_dir(out, width) / "teacher_card.json").read_text())
        rows.append({"width": width, "parameters": card["parameters"],
                     "oracle_forward_kl": card["metrics"]["oracle_forward_kl"]})
    return rows


STEPS = [400]  # the students' training steps (--steps)


def sweep(out: Path, name: str, grid: dict, seeds: int, jobs: int, overrides: list[str]):
    import distill

    steps = STEPS[0]
    return distill.sweep(str(BASE), grid, seeds=seeds, output=out / name, jobs=jobs,
                         overrides=["train.threads=1", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                    f"eval.every={steps}", *overrides], progress=lambda line: print(line, flush=True))


def plot(report: dict, path: Path) -> None:
    """Left: the student's KL to the oracle against its teacher's size (and each teacher's own KL); right:
    alone vs distilled students against the student's size. Means with 95% t intervals over seeds."""
    from distill.core.report import pyplot
    from distill.core.stats import interval

    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if "teacher_axis" in report and "teachers" in report:
        sizes = {f"h{row['width']}": row for row in report["teachers"]}
        xs, means, errors = [], [], []
        for point in report["teacher_axis"]["points"]:
            row = sizes[Path(point["point"]["teacher.path"]).name]
            entry = point["intervals"]["oracle_forward_kl"]
            xs.append(row["parameters"])
            means.append(entry["mean"])
            errors.append(entry["mean"] - entry["low"])
        left.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label="student (0.14M) distilled from it")
        left.plot([r["parameters"] for r in report["teachers"]], [r["oracle_forward_kl"] for r in report["teachers"]],
                  "s--", color="gray", label="the teacher itself")
        left.set(xscale="log", yscale="log", xlabel="teacher parameters", ylabel="exact KL(oracle || model)",
                 title="teacher size (one student, 3 seeds)")
        left.legend(fontsize=8)
    if "student_axis" in report:
        for row, colour in (("alone", "tab:orange"), ("distilled", "tab:blue")):
            xs, means, errors = [], [], []
            for point in report["student_axis"]["points"]:
                values = [rows[row]["oracle_forward_kl"] for rows in point["all_rows"].values()]
                spread = interval(values)
                xs.append(next(iter(point["all_rows"].values()))[row]["parameters"])
                means.append(spread.mean)
                errors.append(spread.half_width)
            right.errorbar(xs, means, yerr=errors, marker="o", capsize=3, color=colour, label=row)
        right.set(xscale="log", yscale="log", xlabel="student parameters", ylabel="exact KL(oracle || student)",
                  title="student size (1M teacher, 3 seeds)")
        right.legend(fontsize=8)
    from matplotlib.ticker import NullFormatter

    for axis in (left, right):
        axis.xaxis.set_minor_formatter(NullFormatter())
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/capacity-gap"))
    parser.add_argument("--stages", nargs="+", default=["teachers", "teacher_axis", "chain", "student_axis"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=400, help="each student's training steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write the two-panel figure here")
    parser.add_argument("--from-json", type=Path, help="with --plot: draw the figure from an earlier --json")
    args = parser.parse_args()
    STEPS[0] = args.steps
    out = args.out.resolve()
    report: dict = {}
    if args.from_json is not None:  # only the figure, from an earlier run's --json
        plot(json.loads(args.from_json.read_text()), args.plot)
        return
    if "teachers" in args.stages:
        train_teachers(out, args.teacher_steps, args.jobs)
        report["teachers"] = teacher_table(out)
        for row in report["teachers"]:
            print(f"| h{row['width']} | {row['parameters']:,} | {row['oracle_forward_kl']:.4f} |")
    if "teacher_axis" in args.stages:
        result = sweep(out, "teacher_axis", {"teacher.path": [str(teacher_dir(out, w)) for w in WIDTHS]},
                       args.seeds, args.jobs, ["train.baseline=false"])
        print(result.table())
        report["teacher_axis"] = json.loads((out / "teacher_axis" / "summary.json").read_text())
    if "chain" in args.stages:
        biggest = str(teacher_dir(out, WIDTHS[-1]))
        chains = [[]] + [[{"config": {"hidden_size": w, "num_hidden_layers": 4, "num_attention_heads": 4,
                                      "intermediate_size": 4 * w}}] for w in WIDTHS[:-1] if w > 64]
        result = sweep(out, "chain", {"assistants": chains}, args.seeds, args.jobs,
                       [f"teacher.path={biggest}", "train.baseline=false"])
        print(result.table())
        report["chain"] = json.loads((out / "chain" / "summary.json").read_text())
    if "student_axis" in args.stages:
        result = sweep(out, "student_axis", {"student.config": [
            {"hidden_size": w, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 4 * w}
            for w in STUDENT_WIDTHS]}, args.seeds, args.jobs, [])
        print(result.table())
        report["student_axis"] = json.loads((out / "student_axis" / "summary.json").read_text())
    if args.plot:
        plot(report, args.plot)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
