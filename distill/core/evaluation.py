"""`distill eval` and `distill compare`, for every family.

    evaluate(TARGET)   TARGET a finished run directory: its saved models re-evaluated on its recipe's data
                       (overrides such as `data.eval=other.jsonl` change what they are scored on), the
                       teacher's row first; or one saved model (a student directory): scored alone on
                       `data` (`builtin:<task>` or a data file), or on a recipe's data with its teacher
                       (by default the recipe of the run the model was saved in, if it was).
    compare(RUNS)      finished runs side by side: one table of every metric the runs share (the best
                       value of each column marked), the eval curves of all runs overlaid;
                       compare.md / compare.html (+ plots/) when an output directory is given.
"""
from __future__ import annotations

import html
from pathlib import Path

import yaml

from distill.core.errors import DistillError
from distill.core.families import family_names, family_of_model, get_family
from distill.core.io import atomic_write_json, atomic_write_text, read_jsonl
from distill.core.recipe import load_recipe, parse_recipe
from distill.core.report import (COLUMN_LABELS, cell, html_images, html_page, html_table, plot_metric)
from distill.core.rundir import METRICS_FILE, RECIPE_FILE, RunResult

# Which way is better, for the metrics families report (a run's meta may add its own under `directions`).
HIGHER_IS_BETTER = {"accuracy", "exact_match", "rouge_l", "teacher_top1_agreement", "modes_covered", "precision", "recall",
                    "generation_tokens_per_second", "examples_per_second"}
LOWER_IS_BETTER = {"nll", "ece", "teacher_kl", "oracle_forward_kl", "oracle_reverse_kl", "fd", "mmd",
                   "sliced_wasserstein", "tv", "function_evaluations", "sample_seconds", "parameters"}


# ---- evaluate ------------------------------------------------------------------------------------------

def evaluate(target: str | Path, *, data: str | None = None, recipe: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = (), output: str | Path | None = None) -> RunResult:
    """The rows of a finished run's saved models, or of one saved model, as a run reports them (see the
    module docstring). With `output`, the result is also written there as JSON ({rows, meta})."""
    target = Path(target)
    if not target.is_dir():
        raise DistillError(f"`{target}` is not a directory", field="TARGET",
                           fix="give a run directory or a saved model directory")
    if (target / RECIPE_FILE).is_file():  # a run directory
        if data is not None:
            raise DistillError("--data is for a lone saved model; a run is scored on its recipe's data",
                               field="--data", fix="use --set data.eval=FILE (or data.builtin=...) to change it")
        saved = yaml.safe_load((target / RECIPE_FILE).read_text()) or {}
        if saved.get("api"):
            raise DistillError(f"`{target}` was made from Python ({saved['api']}) with models distill cannot "
                               "rebuild from files", field="TARGET",
                               fix="evaluate its saved student alone: distill eval TARGET/student --data ...")
        checked = load_recipe(recipe, overrides) if recipe is not None else parse_recipe(saved, overrides)
        family = get_family(checked.task)
        models = family.saved_models(target)
        if not models:
            raise DistillError(f"`{target}` holds no saved model yet (the run has not finished a phase)",
                               field="TARGET", fix="finish it with `distill run RECIPE --resume`")
    else:
        family = family_of_model(target)
        if family is None:
            raise DistillError(f"`{target}` is neither a run directory (recipe.yaml) nor a saved model of any "
                               f"family ({', '.join(family_names())})", field="TARGET",
                               fix="give a run's output directory or one of its model directories (student/)")
        parent = yaml.safe_load((target.parent / RECIPE_FILE).read_text()) \
            if (target.parent / RECIPE_FILE).is_file() else None
        if recipe is not None:
            checked = load_recipe(recipe, overrides)
        elif data is None and parent and not parent.get("api"):  # a run's student/: its run's data and teacher
            checked = parse_recipe(parent, overrides)
        else:
            checked = parse_recipe(family.eval_recipe(target, data), overrides)
        if checked.task != family.task:
            raise DistillError(f"`{target}` is a {family.task} model and the recipe is for task {checked.task}",
                               field="--recipe", fix=f"give a task: {family.task} recipe")
        models = {"model": target}
    result = family.evaluate(checked, models)
    result.run_dir = target
    result.meta.update({"task": checked.task, "evaluated": str(target), "name": checked.name})
    if output is not None:
        atomic_write_json(output, result.to_json())
    return result


# ---- compare -------------------------------------------------------------------------------------------

def direction(metric: str, meta: dict) -> str | None:
    """"higher", "lower" or None (no better side, e.g. a count)."""
    if metric in meta.get("directions", {}):
        return meta["directions"][metric]
    if metric == meta.get("primary_metric"):
        return "higher" if meta.get("higher_is_better") else "lower"
    return "higher" if metric in HIGHER_IS_BETTER else "lower" if metric in LOWER_IS_BETTER else None


def _run_names(runs: list[Path]) -> list[str]:
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return names
    return [str(run) for run in runs]  # two runs of the same name: their paths tell them apart


def compare(runs: list[str | Path], *, output: str | Path | None = None) -> str:
    """The markdown comparison of finished runs (see the module docstring); written with its HTML and plot
    into `output` when given."""
    if len(runs) < 2:
        raise DistillError("compare needs two or more runs", field="RUNS", fix="distill compare RUN RUN ...")
    paths = [Path(run) for run in runs]
    results = [RunResult.load(path) for path in paths]
    names = _run_names(paths)
    tasks = sorted({r.meta.get("task", "?") for r in results})
    # Every metric each run reports somewhere, in the first run's column order.
    per_run = [set(k for row in r.rows.values() for k in row) for r in results]
    order = list(dict.fromkeys(k for r in results for row in r.rows.values() for k in row))
    hidden = set(k for r in results for k in r.meta.get("hidden_columns", ()))
    shared = [k for k in order if all(k in keys for keys in per_run) and k not in hidden]
    primary = results[0].meta.get("primary_metric")
    if primary in shared:
        shared.remove(primary)
        shared.insert(0, primary)
    rows = [(f"{name} / {row}", values, r.meta) for name, r in zip(names, results) for row, values in r.rows.items()]
    best: dict[str, float] = {}
    for metric in shared:
        way = direction(metric, results[0].meta)
        values = [values[metric] for _, values, _ in rows if isinstance(values.get(metric), (int, float))]
        if way and values:
            best[metric] = max(values) if way == "higher" else min(values)
    header = ["run / model"] + [COLUMN_LABELS.get(k, k) for k in shared]
    body = [[label] + [cell(k, values.get(k)) + (" *" if k in best and values.get(k) == best[k] else "")
                       for k in shared] for label, values, _ in rows]
    notes = ["`*` marks the best value of each column (higher or lower, as the metric goes)."]
    if len(tasks) > 1:
        notes.append(f"These runs are of different tasks ({', '.join(tasks)}): only the metrics they share are shown.")
    only = {name: sorted(keys - set(shared) - hidden) for name, keys in zip(names, per_run)}
    notes += [f"Only in {name}: {', '.join(keys)}." for name, keys in only.items() if keys]
    lines = ["# distill compare", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", *notes, ""]
    if output is not None:
        output = Path(output)
        (output / "plots").mkdir(parents=True, exist_ok=True)
        plots = []
        metric = primary if primary in shared else None
        if metric is not None:
            series = {}
            for name, path in zip(names, paths):
                records = read_jsonl(path / METRICS_FILE)
                for phase in dict.fromkeys(r["phase"] for r in records):
                    series[f"{name} / {phase}"] = [r for r in records if r["phase"] == phase]
            plot = plot_metric(series, metric, output / "plots" / "eval_curves.png",
                               title=f"eval {metric} vs step, every run")
            if plot is not None:
                plots.append(plot)
                lines += [f"![eval curves](plots/{plot.name})", ""]
        atomic_write_text(output / "compare.md", "\n".join(lines))
        paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in notes)
        atomic_write_text(output / "compare.html", html_page(
            "distill compare", "<h1>distill compare</h1>" + html_table(header, body) + paragraphs + html_images(plots)))
    return "\n".join(lines)
