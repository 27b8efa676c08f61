"""The one report writer of every family: the rows as a table, `report.md`, a self-contained
`report.html`, `plots/*.png` (training losses; the primary metric during training; then the family's
own figures) and `results.json` ({rows, meta}), written last."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Callable

from distill.core.io import atomic_write_json, atomic_write_text, read_jsonl

# Columns every family may report, in this order after the primary metric and the task's own metrics.
COMMON_COLUMNS = ("nll", "teacher_top1_agreement", "teacher_kl", "parameters", "generation_tokens_per_second",
                  "examples_per_second", "function_evaluations", "sample_seconds")
COLUMN_LABELS = {"teacher_top1_agreement": "top1=T", "generation_tokens_per_second": "gen tok/s",
                 "oracle_forward_kl": "KL(oracle‖m)", "oracle_reverse_kl": "KL(m‖oracle)", "parameters": "params",
                 "exact_match": "exact match", "rouge_l": "ROUGE-L", "teacher_kl": "KL(T‖m)", "examples_per_second": "ex/s",
                 "ece": "ECE", "function_evaluations": "NFE", "sample_seconds": "sample s"}
RATE_COLUMNS = ("generation_tokens_per_second", "examples_per_second")


def columns(rows: dict[str, dict], meta: dict) -> list[str]:
    """Primary metric first, then the task's other metrics, then the common ones; hidden ones left out."""
    hidden = set(meta.get("hidden_columns", ()))
    present = [key for key in dict.fromkeys(k for row in rows.values() for k in row) if key not in hidden]
    primary = meta.get("primary_metric")
    task_metrics = [k for k in present if k not in COMMON_COLUMNS and k != primary]
    return [k for k in dict.fromkeys([primary, *task_metrics, *COMMON_COLUMNS]) if k in present]


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if key in RATE_COLUMNS:
        return f"{value:,.0f}"
    return f"{value:.4f}"


def table_rows(rows: dict[str, dict], meta: dict) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the table of `rows`."""
    keys = columns(rows, meta)
    header = ["model"] + [COLUMN_LABELS.get(k, k) for k in keys]
    return header, [[name] + [cell(k, row.get(k)) for k in keys] for name, row in rows.items()]


def verdict_line(rows: dict[str, dict], meta: dict) -> str:
    """Whether distillation beat the student trained alone on the primary metric (when both rows exist)."""
    metric = meta.get("primary_metric")
    alone, distilled = rows.get("alone", {}).get(metric), rows.get("distilled", {}).get(metric)
    if alone is None or distilled is None:
        return ""
    higher = bool(meta.get("higher_is_better"))
    better = distilled > alone if higher else distilled < alone
    return (f"{metric} ({'higher' if higher else 'lower'} is better): distilled {distilled:.4f} vs alone {alone:.4f} "
            f"-> {'distillation helped' if better else 'distillation did NOT help'}")


def best_line(best: dict[str, dict]) -> str:
    if not best:
        return ""
    return "best eval during training: " + ", ".join(
        f"{phase} {b['value']:.4f} at step {b['step']}" for phase, b in best.items())


def notes(rows: dict[str, dict], meta: dict) -> list[str]:
    """The lines under a table: the verdict, the best evals during training, the family's notes."""
    lines = [verdict_line(rows, meta), best_line(meta.get("best_eval", {})), *meta.get("notes", ())]
    return [line for line in lines if line]


def format_table(rows: dict[str, dict], meta: dict) -> str:
    """A markdown table of the rows with its notes."""
    header, body = table_rows(rows, meta)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines + [""] + notes(rows, meta))


def best_evals(metrics_file: Path, metric: str, higher_is_better: bool) -> dict[str, dict]:
    """Each phase's best eval of `metric` during training ({phase: {step, value}}): the rows are the
    final models, and a student that overfits peaks earlier; an honest report says so."""
    best = {}
    for record in read_jsonl(metrics_file):
        value = record.get(metric)
        if value is None:
            continue
        current = best.get(record["phase"])
        if current is None or (value > current["value"] if higher_is_better else value < current["value"]):
            best[record["phase"]] = {"step": record["step"], "value": value}
    return best


def step_time_line(losses: list[dict]) -> str:
    """Median seconds per step of each phase, split into generation, teacher and the rest (student
    forward, loss, backward, optimizer)."""
    parts = []
    for phase in dict.fromkeys(r["phase"] for r in losses):
        mine = [r for r in losses if r["phase"] == phase and "step_seconds" in r]
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


# ---- plots ---------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(losses: list[dict], path: Path) -> Path | None:
    """One panel per phase (losses of different phases live on different scales)."""
    phases = list(dict.fromkeys(r["phase"] for r in losses))
    if not phases:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for axis, phase in zip(axes[0], phases):
        points = [r for r in losses if r["phase"] == phase]
        parts = [key for key in ("kd", "ce") if any(r.get(key) for r in points)]
        for key, label in (("loss", "total"), ("kd", "divergence"), ("ce", "hard-label CE")):
            if key in parts or (key == "loss" and (len(parts) != 1)):
                axis.plot([r["step"] for r in points], [r.get(key) for r in points], label=label)
        axis.set(xlabel="step", ylabel="training loss", title=phase)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_metric(series: dict[str, list[dict]], metric: str, path: Path, *, title: str,
                references: dict[str, float] | None = None) -> Path | None:
    """`metric` against step, one line per series (e.g. a phase, or a run's phase); dashed references."""
    series = {name: [r for r in records if metric in r] for name, records in series.items()}
    series = {name: records for name, records in series.items() if records}
    if not series:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, records in series.items():
        axis.plot([r["step"] for r in records], [r[metric] for r in records], marker="o", label=name)
    for name, value in (references or {}).items():
        axis.axhline(value, color="gray", linestyle="--", label=name)
    axis.set(xlabel="step", ylabel=COLUMN_LABELS.get(metric, metric), title=title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_metrics(series: dict[str, list[dict]], metrics: list[str], path: Path, *,
                 references: dict[str, float] | None = None) -> Path | None:
    """One panel per metric against step, one line per series (each trained row's evals), the teacher's
    value as a dashed line: where each student stands against the teacher, metric by metric."""
    metrics = [m for m in metrics if any(m in r for records in series.values() for r in records)]
    if not metrics:
        return None
    plt = pyplot()
    columns = min(len(metrics), 3)
    rows = -(-len(metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 2.9 * rows + 0.5), squeeze=False)
    legend = {}
    for axis, metric in zip(axes.flat, metrics):
        for name, records in series.items():
            points = [r for r in records if metric in r and isinstance(r[metric], (int, float))]
            if points:
                legend[name], = axis.plot([r["step"] for r in points], [r[metric] for r in points], marker="o",
                                          markersize=3, label=name, color=ROW_COLORS.get(name))
        if references and references.get(metric) is not None:
            legend["teacher"] = axis.axhline(references[metric], color="gray", linestyle="--", label="teacher")
        axis.set_title(COLUMN_LABELS.get(metric, metric), fontsize=10)
        axis.tick_params(labelsize=8)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    # one legend for every panel and a fixed layout: tight_layout and a legend per panel would double the
    # time of the report of a small run
    figure.legend(list(legend.values()), list(legend), loc="upper center", ncols=len(legend), fontsize=8)
    figure.supxlabel("step", fontsize=9)
    top = 1 - 0.45 / figure.get_figheight()
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / figure.get_figheight(), top=top - 0.04,
                           wspace=0.28, hspace=0.45)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


ROW_COLORS = {"teacher": "tab:gray", "alone": "tab:orange", "distilled": "tab:blue"}  # the same row, the same colour


def plot_histograms(panels: dict[str, dict[str, list[float]]], path: Path, *, log_x: tuple[str, ...] = (),
                    log_y: tuple[str, ...] = ()) -> Path | None:
    """One panel per title, overlaid histograms of each series' values (shared bins), e.g. per-token KL of
    each model; panels named in `log_x` get logarithmic bins over the positive values, those in `log_y` a
    logarithmic count axis (most tokens easy, a long tail of hard ones)."""
    import numpy as np

    panels = {title: {name: np.asarray(values, dtype=float) for name, values in series.items() if len(values)}
              for title, series in panels.items()}
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels.items()):
        values = np.concatenate(list(series.values()))
        if title in log_x:
            positive = values[values > 0]
            low, high = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
            bins = np.geomspace(max(low, 1e-8), max(high, low * 10, 1e-7), 40)
            axis.set_xscale("log")
        else:
            bins = np.linspace(values.min(), max(values.max(), values.min() + 1e-9), 40)
        for name, data in series.items():  # the mean of the values themselves; out-of-range ones drawn at the ends
            axis.hist(np.clip(data, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.5,
                      color=ROW_COLORS.get(name), log=title in log_y,
                      label=f"{name} (mean {data.mean():.3g}, n={data.size})")
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("tokens")
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def generation_table(generations: dict[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the example generations: prompt, reference, then each model's answer."""
    order = ["prompt", "reference", "teacher", "alone", "distilled"]
    keys = [k for k in order if k in generations] + [k for k in generations if k not in order]
    count = max(len(v) for v in generations.values())
    return keys, [[(generations[k][i] if i < len(generations[k]) else "") for k in keys] for i in range(count)]


# ---- the writer ----------------------------------------------------------------------------------

def html_page(title: str, body: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "th.text{text-align:left}td.text{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:260px;font-size:90%}"
            "img{max-width:100%}</style></head><body>" + body + "</body></html>\n")


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return "<table><tr>" + head + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>"


def html_images(plots: list[Path]) -> str:
    return "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   "</figure>" for p in plots)


def write_report(run_dir: Path, result, figures: Callable[[Path], list[Path]] | None = None) -> None:
    """report.md, report.html, plots/ and, last, results.json for a finished run."""
    run_dir = Path(run_dir)
    meta = result.meta
    losses, metrics_file = read_jsonl(run_dir / "losses.jsonl"), run_dir / "metrics.jsonl"
    meta["best_eval"] = best_evals(metrics_file, result.primary_metric, result.higher_is_better)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    history = read_jsonl(metrics_file)
    phases = {phase: [r for r in history if r["phase"] == phase] for phase in dict.fromkeys(r["phase"] for r in history)}
    teacher = result.rows.get("teacher", {})
    recorded = [k for k in dict.fromkeys(k for r in history for k in r) if k not in ("phase", "step")]
    metrics = [k for k in dict.fromkeys([result.primary_metric, *columns(result.rows, meta), *recorded])
               if k in recorded and k not in set(meta.get("hidden_columns", ()))]
    plots = [plot_losses(losses, plots_dir / "loss.png"),
             plot_metrics(phases, metrics, plots_dir / "eval_metric.png", references=teacher)]
    plots = [p for p in plots if p is not None] + list(figures(plots_dir) if figures else [])
    name = meta.get("name", run_dir.name)
    summary = (f"World size {meta.get('world_size', 1)}; {meta.get('seconds', 0):.0f} s in all. "
               f"{meta.get('rows_note', '')}").strip()
    timing = step_time_line(losses)
    markdown = [f"# distill run `{name}` ({meta.get('task', '')})", "", result.table(), "", summary, timing, ""]
    generations = generation_table(meta["generations"]) if meta.get("generations") else None
    if generations:
        def flat(text):
            return str(text).replace("|", "\\|").replace("\n", " ")
        markdown += ["## Example generations", "", "| " + " | ".join(generations[0]) + " |",
                     "|" + "---|" * len(generations[0])]
        markdown += ["| " + " | ".join(flat(c) for c in row) + " |" for row in generations[1]] + [""]
    markdown += [f"![{p.stem}](plots/{p.name})" for p in plots]
    atomic_write_text(run_dir / "report.md", "\n".join(markdown) + "\n")
    header, body = table_rows(result.rows, meta)
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in [*notes(result.rows, meta), summary, timing] if line)
    recipe = html.escape(json.dumps(meta.get("recipe", {}), indent=1))
    examples = ("<h2>Example generations</h2>" + html_table(*generations).replace("<td>", "<td class='text'>")
                .replace("<th>", "<th class='text'>")
                if generations else "")
    atomic_write_text(run_dir / "report.html", html_page(
        f"distill: {name}", f"<h1>distill run {html.escape(name)}</h1>" + html_table(header, body) + paragraphs
        + examples + html_images(plots) + f"<details><summary>recipe</summary><pre>{recipe}</pre></details>"))
    atomic_write_json(run_dir / "results.json", result.to_json())  # last: marks the run finished
