"""The end of every run: `results.json`, `report.md`, a self-contained `report.html` and
`plots/*.png` (loss curves; eval metric vs step for both students)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

ROW_NAMES = ("teacher", "alone", "distilled")
ROW_LABELS = {"teacher": "teacher", "alone": "alone", "distilled": "distilled"}
HIDDEN_COLUMNS = ("oracle_entropy",)  # a property of the eval data, the same in every row: a footnote
COLUMN_ORDER = ("nll", "teacher_top1_agreement", "teacher_kl", "parameters", "generation_tokens_per_second",
                "examples_per_second")
COLUMN_LABELS = {"teacher_top1_agreement": "top1=T", "generation_tokens_per_second": "gen tok/s",
                 "oracle_forward_kl": "KL(oracle‖m)", "oracle_reverse_kl": "KL(m‖oracle)", "parameters": "params",
                 "exact_match": "exact match", "teacher_kl": "KL(T‖m)", "examples_per_second": "ex/s",
                 "ece": "ECE"}


def columns(rows: dict[str, dict], primary_metric: str) -> list[str]:
    """Primary metric first, then the other task metrics, then the common ones."""
    present = [key for row in rows.values() for key in row]
    task_metrics = [k for k in dict.fromkeys(present)
                    if k not in COLUMN_ORDER and k != primary_metric and k not in HIDDEN_COLUMNS]
    return [k for k in dict.fromkeys([primary_metric, *task_metrics, *COLUMN_ORDER]) if k in present]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return f"{int(value):,}"
    if key in ("generation_tokens_per_second", "examples_per_second"):
        return f"{value:,.0f}"
    return f"{value:.4f}"


def table_rows(rows: dict[str, dict], primary_metric: str) -> tuple[list[str], list[list[str]]]:
    keys = columns(rows, primary_metric)
    header = ["model"] + [COLUMN_LABELS.get(k, k) for k in keys]
    body = [[ROW_LABELS[name]] + [_cell(k, rows[name].get(k)) for k in keys] for name in ROW_NAMES if name in rows]
    return header, body


def format_table(rows: dict[str, dict], primary_metric: str, higher_is_better: bool) -> str:
    """A plain-text (markdown) table of the rows, with a line on who wins the primary metric."""
    header, body = table_rows(rows, primary_metric)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    notes = [verdict_line(rows, primary_metric, higher_is_better), footnote(rows)]
    return "\n".join(lines + [""] + [n for n in notes if n])


def best_evals(run_dir: Path, primary_metric: str, higher_is_better: bool) -> dict[str, dict]:
    """Each phase's best eval of the primary metric during training ({phase: {step, value}}).

    The rows are the final models (same steps for both students); a student alone that overfits
    its data peaks earlier, and an honest report says so."""
    best = {}
    for record in _read_jsonl(Path(run_dir) / "metrics.jsonl"):
        value = record.get(primary_metric)
        if value is None:
            continue
        current = best.get(record["phase"])
        if current is None or (value > current["value"] if higher_is_better else value < current["value"]):
            best[record["phase"]] = {"step": record["step"], "value": value}
    return best


def best_line(best: dict[str, dict]) -> str:
    if not best:
        return ""
    return "best eval during training: " + ", ".join(
        f"{ROW_LABELS.get(phase, phase)} {b['value']:.4f} at step {b['step']}" for phase, b in best.items())


def footnote(rows: dict[str, dict]) -> str:
    entropy = next((r["oracle_entropy"] for r in rows.values() if "oracle_entropy" in r), None)
    return "" if entropy is None else f"oracle entropy (the floor of any model's nll): {entropy:.4f} nats/token"


def verdict_line(rows: dict[str, dict], primary_metric: str, higher_is_better: bool) -> str:
    if "alone" not in rows or "distilled" not in rows:
        return ""
    alone, distilled = rows["alone"].get(primary_metric), rows["distilled"].get(primary_metric)
    if alone is None or distilled is None:
        return ""
    better = distilled > alone if higher_is_better else distilled < alone
    direction = "higher" if higher_is_better else "lower"
    return (f"{primary_metric} ({direction} is better): distilled {distilled:.4f} vs alone {alone:.4f} -> "
            f"{'distillation helped' if better else 'distillation did NOT help'}")


def _read_jsonl(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def make_plots(run_dir: Path, primary_metric: str, rows: dict[str, dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    losses, metrics = _read_jsonl(run_dir / "losses.jsonl"), _read_jsonl(run_dir / "metrics.jsonl")
    phases = list(dict.fromkeys(r["phase"] for r in losses)) or ["-"]
    # One panel per phase: the divergence and cross-entropy live on different scales.
    figure, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for axis, phase in zip(axes[0], phases):
        points = [r for r in losses if r["phase"] == phase]
        parts = [key for key in ("kd", "ce") if any(r.get(key) for r in points)]
        for key, label in (("loss", "total"), ("kd", "divergence"), ("ce", "hard-label CE")):
            if key in parts or (key == "loss" and len(parts) > 1):
                axis.plot([r["step"] for r in points], [r[key] for r in points], label=label)
        axis.set(xlabel="step", ylabel="training loss", title=ROW_LABELS.get(phase, phase))
        axis.legend()
    figure.tight_layout(); figure.savefig(plots / "loss.png", dpi=110); plt.close(figure)
    written.append(plots / "loss.png")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for phase in dict.fromkeys(r["phase"] for r in metrics):
        points = [r for r in metrics if r["phase"] == phase and primary_metric in r]
        axis.plot([r["step"] for r in points], [r[primary_metric] for r in points], marker="o", label=ROW_LABELS.get(phase, phase))
    if primary_metric in rows.get("teacher", {}):
        axis.axhline(rows["teacher"][primary_metric], color="gray", linestyle="--", label="teacher")
    axis.set(xlabel="step", ylabel=COLUMN_LABELS.get(primary_metric, primary_metric), title=f"eval {primary_metric} vs step")
    axis.legend(); figure.tight_layout(); figure.savefig(plots / "eval_metric.png", dpi=110); plt.close(figure)
    written.append(plots / "eval_metric.png")
    return written


def step_time_line(run_dir: Path) -> str:
    """Median seconds per step of each phase, split into generation, teacher and the rest (student
    forward, loss, backward, optimizer), from losses.jsonl."""
    records = _read_jsonl(run_dir / "losses.jsonl")
    parts = []
    for phase in dict.fromkeys(r["phase"] for r in records):
        mine = [r for r in records if r["phase"] == phase and "step_seconds" in r]
        if not mine:
            continue

        def median(key):
            values = sorted(r.get(key, 0.0) for r in mine)
            return values[len(values) // 2]
        total, generate, teacher = median("step_seconds"), median("generate_seconds"), median("teacher_seconds")
        split = f"generate {generate:.3f}, " if any("generate_seconds" in r for r in mine) else ""
        student = max(total - generate - teacher, 0.0)
        parts.append(f"{phase} {total:.3f} s ({split}teacher {teacher:.3f}, student {student:.3f})")
    return ("Median step time: " + "; ".join(parts) + ".") if parts else ""


def write_report(result) -> None:
    """results.json, report.md, report.html and plots for a RunResult."""
    run_dir = Path(result.run_dir)
    best = best_evals(run_dir, result.primary_metric, result.higher_is_better)
    result.extras["best_eval"] = best
    results = {"rows": result.rows, "primary_metric": result.primary_metric,
               "higher_is_better": result.higher_is_better, **result.extras}
    plots = make_plots(run_dir, result.primary_metric, result.rows)
    table = result.table()
    name = result.extras.get("recipe", {}).get("name", run_dir.name)
    markdown = [f"# distill run `{name}`", "", table, best_line(best), "",
                f"World size {result.extras.get('world_size', 1)}; {result.extras.get('seconds', 0):.0f} s in all. "
                "Rows are evaluated on the same eval data; `alone` is the student trained on hard labels with the "
                "same init, data order and steps.", step_time_line(run_dir), ""]
    markdown += [f"![{p.stem}](plots/{p.name})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(markdown) + "\n")
    header, body = table_rows(result.rows, result.primary_metric)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    images = "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
                     for p in plots)
    verdict = html.escape(verdict_line(result.rows, result.primary_metric, result.higher_is_better))
    recipe = html.escape(json.dumps(result.extras.get("recipe", {}), indent=1))
    (run_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>distill: {html.escape(name)}</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>distill run {html.escape(name)}</h1><table><tr>{cells}</tr>{body_html}</table><p>{verdict}</p><p>{html.escape(best_line(best))}</p><p>{html.escape(step_time_line(run_dir))}</p>"
        f"{images}<details><summary>recipe</summary><pre>{recipe}</pre></details></body></html>\n")
    # Written last: its presence marks a finished run.
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
