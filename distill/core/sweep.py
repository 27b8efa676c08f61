"""`distill sweep`: a grid of recipe settings x seeds, each a normal run, summarized with confidence intervals.

    distill sweep RECIPE --grid objective.loss=forward_kl,reverse_kl --grid objective.beta=0.1,0.5 --seeds 3

The sweep directory (default runs/<name>-sweep):

    <point>/seed<k>/   a normal run directory per grid point and seed (`loss=jsd,beta=0.5/seed0`)
    logs/<point>-seed<k>.log   what each run printed
    sweep.json         what was asked (recipe, grid, seeds), written before the first run
    summary.json       every point's per-seed metrics of every row, its intervals, the best point
    sweep.md, sweep.html, plots/<axis>.png   the table and each metric against each grid axis

Everything is checked before anything runs: every point's recipe is validated (a bad grid value names
its `--grid` field), and every existing point directory must hold the same recipe (outputs and thread
counts aside). A rerun skips finished points, resumes interrupted ones from their checkpoints, and adds
the points and seeds a grown grid asks for. With `--jobs N`, N worker processes each get
cores // N torch threads.
"""
from __future__ import annotations

import contextlib
import html
import itertools
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from distill.core.errors import DistillError
from distill.core.io import atomic_write_json, atomic_write_text
from distill.core.recipe import RunRecipe, fields_at, load_recipe
from distill.core.rundir import RECIPE_FILE, RESULTS_FILE, RunDirectory, recipe_differences

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
THREADS_FIELD = "train.threads"
NOT_IDENTITY = {"output", THREADS_FIELD}  # where a run is and how many threads it used: not what it computes
TIMING = re.compile(r"(seconds|latency|per_second|throughput)")  # wall-clock columns: never the sweep's target


@dataclass(frozen=True)
class Axis:
    """One `--grid field=v1,v2,...`: the recipe field and its values (YAML-parsed, in the order given)."""

    field: str
    values: tuple
    label: str = ""  # the short name in directory names and tables (the field's last part unless ambiguous)


@dataclass
class Trial:
    """One run of the sweep: a grid point at one seed."""

    point: tuple  # the axis values, in axis order
    slug: str  # the point's directory name
    seed: int
    run_dir: Path
    recipe: RunRecipe
    resume: bool = False  # an interrupted run is in run_dir
    finished: bool = False  # a finished run is in run_dir


@dataclass
class SweepResult:
    """The summary of a sweep: per point its values per seed and intervals; the best point and the verdict."""

    directory: Path
    axes: list[Axis]
    row: str
    metric: str
    higher_is_better: bool
    interval: str
    points: list[dict] = field(default_factory=list)  # {point, slug, seeds: {seed: {metric: value}}, intervals}
    best: int | None = None  # index into points
    runner_up: int | None = None
    comparison: dict | None = None
    failed: list[str] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)  # this invocation's runs: seconds, process id, start, end
    hidden: list[str] = field(default_factory=list)  # columns the runs' reports hide (meta hidden_columns)

    def table(self) -> str:
        header, body = summary_rows(self)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines + [""] + summary_notes(self))


# ---- the grid --------------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """`a,b,[1,2],{x: 1}` -> ['a', 'b', '[1,2]', '{x: 1}']: commas inside brackets or quotes do not split."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [part.strip() for part in parts + [current]]


def parse_grid(specs: list[str] | dict) -> list[Axis]:
    """`--grid field=v1,v2` options (or {field: [values]}) -> the axes, each field once, each value once."""
    raw: list[tuple[str, list]] = []
    if isinstance(specs, dict):
        for key, values in specs.items():
            raw.append((str(key), list(values) if isinstance(values, (list, tuple)) else [values]))
    else:
        for spec in specs:
            key, sep, text = spec.partition("=")
            if not sep or not key.strip() or not text.strip():
                raise DistillError(f"`{spec}` is not of the form field=value1,value2", field="--grid",
                                   fix="write e.g. --grid objective.loss=forward_kl,reverse_kl")
            values = []
            for part in split_values(text):
                try:
                    values.append(yaml.safe_load(part) if part else "")
                except (yaml.YAMLError, ValueError, RecursionError):
                    values.append(part)
            raw.append((key.strip(), values))
    seen, axes = set(), []
    for key, values in raw:
        if key in seen:
            raise DistillError(f"`{key}` is given twice", field=f"--grid {key}", fix="list all its values in one --grid")
        if key in ("output", "name"):
            raise DistillError(f"`{key}` cannot be swept: the sweep places every run", field=f"--grid {key}",
                               fix="use --output for the sweep directory")
        if not values:
            raise DistillError(f"`{key}` has no values", field=f"--grid {key}", fix=f"write --grid {key}=a,b")
        shown = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(shown)) != len(shown):
            raise DistillError(f"`{key}` lists a value twice: {', '.join(shown)}", field=f"--grid {key}",
                               fix="list each value once")
        seen.add(key)
        axes.append((key, tuple(values)))
    last = [key.split(".")[-1] for key, _ in axes]
    return [Axis(key, values, key.split(".")[-1] if last.count(key.split(".")[-1]) == 1 else key)
            for key, values in axes]


def parse_seeds(text: str | int | list) -> list[int]:
    """`3` -> [0, 1, 2]; `0,5,7` -> [0, 5, 7]."""
    if isinstance(text, (list, tuple)):
        seeds = [int(s) for s in text]
    else:
        try:
            parts = [int(p) for p in str(text).split(",")]
        except ValueError:
            raise DistillError(f"--seeds {text!r} is neither a count nor a list of seeds", field="--seeds",
                               fix="write --seeds 3 (seeds 0, 1, 2) or --seeds 0,5,7") from None
        seeds = list(range(parts[0])) if len(parts) == 1 and "," not in str(text) else parts
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise DistillError(f"--seeds {text!r}: at least one seed, none negative, none twice", field="--seeds",
                           fix="write --seeds 3 or --seeds 0,5,7")
    return seeds


def value_text(value: Any) -> str:
    """A grid value as shown in directory names and tables."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def point_slug(axes: list[Axis], point: tuple, short_paths: bool = True) -> str:
    """The point's directory name: `label=value,...` (a path value by its last part when `short_paths`)."""
    if not axes:
        return "base"

    def shown(value) -> str:
        text = value_text(value)
        return Path(text).name if short_paths and isinstance(value, str) and "/" in text and Path(text).name \
            else text
    text = ",".join(f"{axis.label}={shown(value)}" for axis, value in zip(axes, point))
    return re.sub(r"[^A-Za-z0-9_.,=+@-]", "_", text)[:180]


def thread_share(jobs: int) -> int:
    """Torch threads per job: the cores this process may use, split between the jobs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _get(recipe: RunRecipe, dotted: str):
    node: Any = recipe
    for part in dotted.split("."):
        node = getattr(node, part, None) if not isinstance(node, dict) else node.get(part)
        if node is None:
            return None
    return node


def _has_field(recipe: RunRecipe, dotted: str) -> bool:
    *section, name = dotted.split(".")
    return name in fields_at(type(recipe), tuple(section))


# ---- planning: every check, nothing written -----------------------------------------------------------

class Sweep:
    """A planned sweep (`plan()` checks everything and writes nothing); `run()` runs what is not finished."""

    def __init__(self, recipe, grid: list[str] | dict, seeds: str | int | list = 3, *,
                 overrides: list[str] | tuple[str, ...] = (), output: str | Path | None = None,
                 seed_fields: list[str] | tuple[str, ...] = ("train.seed",), jobs: int = 1, interval: str = "t",
                 metric: str | None = None, row: str | None = None):
        from distill.core.stats import INTERVALS

        if jobs < 1:
            raise DistillError(f"--jobs {jobs}: at least 1", field="--jobs", fix="write --jobs 2")
        if interval not in INTERVALS:
            raise DistillError(f"unknown interval `{interval}`", field="--interval", fix=f"use {' or '.join(INTERVALS)}")
        self.source, self.overrides = recipe, list(overrides)
        self.axes, self.seeds = parse_grid(grid), parse_seeds(seeds)
        self.seed_fields, self.jobs, self.interval = list(seed_fields), jobs, interval
        self.metric, self.row = metric, row
        self.base = load_recipe(recipe, self.overrides)
        self.directory = Path(output) if output is not None else Path(f"runs/{self.base.name}-sweep")
        self.trials: list[Trial] = []

    def plan(self) -> list[Trial]:
        base = self.base
        for name in self.seed_fields:
            if not _has_field(base, name):
                raise DistillError(f"the {base.task} recipe has no field `{name}` to put the seed in",
                                   field="--seed-field", fix="name a seed field of the recipe, e.g. train.seed")
        for axis in self.axes:
            if axis.field in self.seed_fields:
                raise DistillError(f"`{axis.field}` is the seed field", field=f"--grid {axis.field}",
                                   fix="use --seeds for it")
        if self.directory.exists() and not self.directory.is_dir():
            raise DistillError(f"`{self.directory}` is a file", field="--output", fix="choose a directory")
        saved = self.directory / SWEEP_FILE
        if self.directory.is_dir() and any(self.directory.iterdir()) and not saved.is_file():
            raise DistillError(f"`{self.directory}` is not empty and holds no sweep ({SWEEP_FILE})", field="--output",
                               fix="choose a new or empty directory for the sweep")
        share = thread_share(self.jobs)
        base_threads = _get(base, THREADS_FIELD) if _has_field(base, THREADS_FIELD) else None
        trials = []
        points = list(itertools.product(*(axis.values for axis in self.axes)))
        short = len({point_slug(self.axes, p) for p in points}) == len(points)  # path values by their last part
        for point in points:
            slug = point_slug(self.axes, point, short_paths=short)
            sets = [f"{axis.field}={json.dumps(value)}" for axis, value in zip(self.axes, point)]
            for seed in self.seeds:
                run_dir = self.directory / slug / f"seed{seed}"
                extra = [f"{name}={seed}" for name in self.seed_fields] + [f"output={json.dumps(str(run_dir))}"]
                if _has_field(base, THREADS_FIELD) and (base_threads is None or base_threads > share) and self.jobs > 1:
                    extra.append(f"{THREADS_FIELD}={share}")  # N jobs on N cores: not N x torch's default
                try:
                    recipe = load_recipe(base, [*sets, *extra])
                except DistillError as error:
                    where = ", ".join(f"{a.field}={value_text(v)}" for a, v in zip(self.axes, point))
                    named = error.field if error.field not in (None, "--set") else next(
                        (f"--grid {a.field}" for a in self.axes if a.field in error.message), error.field)
                    raise DistillError(f"grid point {where}: {error.message}", field=named, fix=error.fix) from None
                trial = Trial(point, slug, seed, run_dir, recipe)
                self._check_existing(trial)
                trials.append(trial)
        slugs = [t.slug for t in trials]
        if len(set(slugs)) != len(slugs) // len(self.seeds):
            raise DistillError("two grid points share a directory name", field="--grid",
                               fix="use values that differ in letters or digits")
        self.trials = trials
        return trials

    def _check_existing(self, trial: Trial) -> None:
        """An existing point directory must hold this point's run: finished (skipped) or interrupted (resumed)."""
        run_dir = RunDirectory(trial.run_dir, resume=(trial.run_dir / RECIPE_FILE).is_file())
        run_dir.check()  # a non-run directory, an unwritable one: refused here, before any run
        saved = trial.run_dir / RECIPE_FILE
        if not saved.is_file():
            return
        changes = [c for c in recipe_differences(saved.read_text(), trial.recipe.to_yaml())
                   if c.split(":")[0] not in NOT_IDENTITY]
        if changes:
            raise DistillError(f"`{trial.run_dir}` holds a run of another recipe ({'; '.join(changes[:3])}"
                               f"{'; ...' if len(changes) > 3 else ''})", field="--output",
                               fix="give the sweep a new --output directory, or delete that run to redo it")
        trial.finished = (trial.run_dir / RESULTS_FILE).is_file()
        trial.resume = not trial.finished
        if trial.resume:  # the interrupted run continues with the thread count it started with
            threads = _get(yaml.safe_load(saved.read_text()) or {}, THREADS_FIELD)
            if _has_field(trial.recipe, THREADS_FIELD):
                trial.recipe = load_recipe(trial.recipe, [f"{THREADS_FIELD}={json.dumps(threads)}"])

    # ---- running ----------------------------------------------------------------------------------

    def spec(self) -> dict:
        return {"recipe": self.base.model_dump(mode="json"), "overrides": self.overrides,
                "grid": {axis.field: list(axis.values) for axis in self.axes}, "seeds": self.seeds,
                "seed_fields": self.seed_fields, "interval": self.interval}

    def run(self, progress: Callable[[str], None] | None = None) -> SweepResult:
        """Run every trial not finished yet (`jobs` at a time), then summarize. `progress(line)` hears each
        trial's end."""
        if not self.trials:
            self.plan()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        atomic_write_json(self.directory / SWEEP_FILE, self.spec())
        todo = [t for t in self.trials if not t.finished]
        say = progress or (lambda line: None)
        say(f"{len(self.trials)} runs ({len(self.trials) - len(todo)} finished before, "
            f"{sum(t.resume for t in todo)} to resume), {self.jobs} at a time")
        failed: list[str] = []
        runs: dict[str, dict] = {}
        done = len(self.trials) - len(todo)

        def finished(trial: Trial, outcome: dict) -> None:
            nonlocal done
            done += 1
            where = f"{trial.slug} seed {trial.seed}"
            runs[f"{trial.slug}/seed{trial.seed}"] = {k: outcome.get(k) for k in ("ok", "seconds", "pid", "start", "end")}
            if outcome["ok"]:
                say(f"[{done}/{len(self.trials)}] {where}: {outcome['seconds']:.0f} s")
            else:
                failed.append(f"{where}: {outcome['error']} (log: {self._log(trial)})")
                say(f"[{done}/{len(self.trials)}] {where}: FAILED: {outcome['error']}")

        jobs = [(t.recipe.model_dump(mode="json", exclude_unset=True), t.resume, str(self._log(t))) for t in todo]
        if self.jobs == 1 or len(todo) <= 1:
            for trial, job in zip(todo, jobs):
                finished(trial, run_trial(*job))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked threads or torch state
            with ProcessPoolExecutor(min(self.jobs, len(todo)), mp_context=context, initializer=init_worker,
                                     initargs=(thread_share(self.jobs),)) as pool:
                futures = {pool.submit(run_trial, *job): trial for trial, job in zip(todo, jobs)}
                for future in as_completed(futures):
                    try:
                        outcome = future.result()
                    except Exception as error:  # the worker process died (killed, out of memory)
                        outcome = {"ok": False, "error": f"the worker died: {type(error).__name__}: {error}"}
                    finished(futures[future], outcome)
        result = summarize(self.directory, self.axes, self.trials, interval=self.interval, metric=self.metric,
                           row=self.row)
        result.failed, result.runs = failed, runs
        write_summary(result)
        return result

    def _log(self, trial: Trial) -> Path:
        return self.directory / "logs" / f"{trial.slug}-seed{trial.seed}.log"


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the sweep process dies (kill -9 included), so that no orphan keeps
    writing a run directory that a rerun of the sweep resumes."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def init_worker(threads: int) -> None:
    """A sweep worker: its share of the cores, set before torch is imported in it."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["DISTILL_SWEEP_WORKER"] = "1"
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def _output_to(log: Path):
    """The trial's output (Python's and, in a worker process, native code's too) appended to its log file."""
    import sys

    with open(log, "a", buffering=1) as file:
        in_worker = os.environ.get("DISTILL_SWEEP_WORKER") == "1"
        saved = (os.dup(1), os.dup(2)) if in_worker else None
        if saved:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(file.fileno(), 1), os.dup2(file.fileno(), 2)
        try:
            with contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
                yield file
        finally:
            if saved:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])


def run_trial(recipe: dict, resume: bool, log: str) -> dict:
    """Run one trial (in this process or a worker); {"ok", "seconds", "error"}. Its output goes to `log`."""
    import warnings

    from distill.core.run import run_recipe

    started, start = time.perf_counter(), time.time()

    def outcome(error: str | None) -> dict:
        return {"ok": error is None, "error": error, "seconds": time.perf_counter() - started, "pid": os.getpid(),
                "start": start, "end": time.time()}

    with _output_to(Path(log)) as file:
        def show(message, category, filename, lineno, file_=None, line=None):
            file.write(warnings.formatwarning(message, category, filename, lineno, line))

        try:
            with warnings.catch_warnings():
                warnings.showwarning = show
                run_recipe(load_recipe(recipe), resume=resume)
        except DistillError as error:
            file.write(f"error {error.render()}\n")
            return outcome(error.render().splitlines()[0])
        except Exception as error:
            file.write(traceback.format_exc())
            return outcome(f"{type(error).__name__}: {error}")
    return outcome(None)


# ---- the summary ------------------------------------------------------------------------------------

def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choose_row(rows: dict[str, dict], row: str | None) -> str:
    """The row the sweep compares: `row`, else `distilled`, else the first `student...` row."""
    if row is not None:
        if row not in rows:
            raise DistillError(f"the runs have no row `{row}` (rows: {', '.join(rows)})", field="--row",
                               fix=f"use one of: {', '.join(rows)}")
        return row
    if "distilled" in rows:
        return "distilled"
    students = [name for name in rows if name.startswith("student")]
    if students:  # a diffusion student scored at several step counts: its first row (name another with --row)
        return students[0]
    raise DistillError(f"which row should the sweep compare? rows: {', '.join(rows)}", field="--row",
                       fix="name one with --row")


def summarize(directory: Path, axes: list[Axis], trials: list[Trial], *, interval: str = "t",
              metric: str | None = None, row: str | None = None) -> SweepResult:
    """Intervals per point and metric of the finished trials; the best point and whether it beats the runner-up."""
    from distill.core import stats
    from distill.core.evaluation import direction

    results: dict[str, dict[int, dict]] = {}
    meta: dict = {}
    for trial in trials:
        file = trial.run_dir / RESULTS_FILE
        if file.is_file():
            data = json.loads(file.read_text())
            results.setdefault(trial.slug, {})[trial.seed] = data["rows"]
            meta = meta or data.get("meta", {})
    if not results:
        return SweepResult(directory, axes, row or "", metric or "", False, interval)
    chosen = choose_row(next(iter(next(iter(results.values())).values())), row)
    primary = metric or meta.get("primary_metric")
    side = direction(primary, meta) if primary else None
    if metric is not None and side is None:
        raise DistillError(f"`{metric}` has no better side that distill knows", field="--metric",
                           fix=f"use the primary metric `{meta.get('primary_metric')}` or one whose direction is known")
    higher = side == "higher"
    result = SweepResult(directory, axes, chosen, primary, higher, interval)
    result.hidden = list(meta.get("hidden_columns", ()))  # properties of the data, the same in every row
    order = {}
    for trial in trials:
        order.setdefault(trial.slug, trial.point)
    for slug, point in order.items():
        seeds = {seed: rows.get(chosen, {}) for seed, rows in sorted(results.get(slug, {}).items())}
        metrics = list(dict.fromkeys(k for values in seeds.values() for k, v in values.items() if _numeric(v)))
        intervals = {}
        for name in metrics:
            spread = stats.interval([values.get(name) for values in seeds.values()], interval)
            intervals[name] = {"mean": spread.mean, "low": spread.low, "high": spread.high, "n": spread.n}
        result.points.append({"point": {a.field: v for a, v in zip(axes, point)}, "slug": slug,
                              "seeds": {str(s): v for s, v in seeds.items()},
                              "all_rows": {str(s): r for s, r in sorted(results.get(slug, {}).items())},
                              "intervals": intervals})
    if primary is not None and any(primary in p["intervals"] for p in result.points):
        ranked = sorted((i for i, p in enumerate(result.points) if primary in p["intervals"]
                         and not math.isnan(p["intervals"][primary]["mean"])),
                        key=lambda i: result.points[i]["intervals"][primary]["mean"], reverse=higher)
        if ranked:
            result.best = ranked[0]
        if len(ranked) > 1:
            result.runner_up = ranked[1]
            best, second = (result.points[i]["seeds"] for i in ranked[:2])
            comparison = stats.compare({s: v.get(primary) for s, v in best.items()},
                                       {s: v.get(primary) for s, v in second.items()}, interval)
            result.comparison = {"difference": comparison.difference.mean, "low": comparison.difference.low,
                                 "high": comparison.difference.high, "p_value": comparison.p_value,
                                 "test": comparison.test, "distinguishable": comparison.distinguishable}
    return result


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4g}"


def interval_text(entry: dict) -> str:
    if entry["n"] < 2:
        return _fmt(entry["mean"]) + (" (n=1)" if entry["n"] == 1 else "")
    return f"{_fmt(entry['mean'])} [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"


def summary_metrics(result: SweepResult) -> list[str]:
    names = [k for k in dict.fromkeys(k for p in result.points for k in p["intervals"]) if k not in result.hidden]
    rest = [k for k in names if k != result.metric and not TIMING.search(k)]
    return ([result.metric] if result.metric in names else []) + rest + [k for k in names if TIMING.search(k)
                                                                          and k != result.metric]


def summary_rows(result: SweepResult, limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, body): a row per point, a column per metric (the first `limit` metrics, target first)."""
    metrics = summary_metrics(result)[:limit]
    header = [axis.label for axis in result.axes] + ["seeds"] + metrics
    body = []
    for index, point in enumerate(result.points):
        cells = [value_text(v) for v in point["point"].values()]
        n = max((e["n"] for e in point["intervals"].values()), default=0)
        cells.append(str(n))
        for name in metrics:
            entry = point["intervals"].get(name)
            text = interval_text(entry) if entry else "-"
            if index == result.best and name == result.metric:
                text = "**" + text + "** (best)"
            cells.append(text)
        body.append(cells or ["base"])
    return header, body


def summary_notes(result: SweepResult) -> list[str]:
    if not result.points:
        return ["no run finished"]
    direction = "higher" if result.higher_is_better else "lower"
    kind = {"t": "Student's t interval over seeds", "bootstrap": "percentile bootstrap interval over seeds "
            "(10,000 resamples)"}[result.interval]
    lines = [f"Row `{result.row}`; each cell: mean [95% {kind}]. Target: `{result.metric}` ({direction} is better)."]
    if result.best is not None and result.comparison is not None:
        best, second = result.points[result.best], result.points[result.runner_up]
        c = result.comparison
        p = "" if math.isnan(c["p_value"]) else f", p = {c['p_value']:.3g}"
        verdict = "distinguishable" if c["distinguishable"] else "NOT distinguishable"
        lines.append(f"Best: {best['slug']}; runner-up: {second['slug']}; difference {_fmt(c['difference'])} "
                     f"[{_fmt(c['low'])}, {_fmt(c['high'])}] ({c['test'] or 'too few seeds'}{p}): {verdict} "
                     "at the 95% level.")
    elif result.best is not None:
        lines.append(f"Best: {result.points[result.best]['slug']} (the only point).")
    if result.failed:
        lines.append(f"{len(result.failed)} runs failed: " + "; ".join(result.failed))
    return lines


def plot_axes(result: SweepResult, plots_dir: Path) -> list[Path]:
    """plots/<axis>.png: per metric, its mean and interval against the axis's values, one line per
    setting of the other axes."""
    from distill.core.report import pyplot

    if not result.axes or not result.points:
        return []
    plt = pyplot()
    metrics = [name for name in summary_metrics(result)  # a metric no setting changes (e.g. parameters) says nothing
               if len({(p["intervals"][name]["mean"], p["intervals"][name]["low"]) for p in result.points
                       if name in p["intervals"]}) > 1]
    if not metrics:
        return []
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for a, axis in enumerate(result.axes):
        numeric = all(_numeric(v) for v in axis.values)
        xs = list(axis.values) if numeric else list(range(len(axis.values)))
        columns = min(3, len(metrics))
        rows = math.ceil(len(metrics) / columns)
        figure, panels = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
        others = [b for b in range(len(result.axes)) if b != a]
        groups: dict[tuple, list[dict]] = {}
        for point in result.points:
            values = list(point["point"].values())
            groups.setdefault(tuple(value_text(values[b]) for b in others), []).append(point)
        for panel, name in zip(panels.flat, metrics):
            for key, members in groups.items():
                by_value = {value_text(list(p["point"].values())[a]): p["intervals"].get(name) for p in members}
                ys = [by_value.get(value_text(v)) for v in axis.values]
                keep = [(x, e) for x, e in zip(xs, ys) if e is not None]
                if not keep:
                    continue
                x = [k[0] for k in keep]
                mean = [k[1]["mean"] for k in keep]
                low = [k[1]["mean"] - k[1]["low"] if k[1]["n"] > 1 else 0.0 for k in keep]
                high = [k[1]["high"] - k[1]["mean"] if k[1]["n"] > 1 else 0.0 for k in keep]
                label = ", ".join(f"{result.axes[b].label}={k}" for b, k in zip(others, key)) or None
                panel.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3, label=label)
            panel.set_title(name, fontsize=9)
            panel.set_xlabel(axis.label)
            if numeric and min(axis.values) > 0 and max(axis.values) / min(axis.values) >= 100:
                panel.set_xscale("log")
            if not numeric:
                panel.set_xticks(xs, [value_text(v) for v in axis.values], rotation=30, fontsize=8)
            if len(groups) > 1 and panel is panels.flat[0]:
                panel.legend(fontsize=7)
        for panel in list(panels.flat)[len(metrics):]:
            panel.axis("off")
        figure.suptitle(f"{result.row}: mean and 95% interval over seeds against {axis.label}", fontsize=10)
        figure.tight_layout()
        path = plots_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]', '_', axis.label)}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def write_summary(result: SweepResult) -> None:
    """summary.json, sweep.md, sweep.html and plots/ in the sweep directory."""
    from distill.core.report import html_images, html_page, html_table

    directory = result.directory
    plots = plot_axes(result, directory / "plots")
    atomic_write_json(directory / SUMMARY_FILE, {
        "row": result.row, "metric": result.metric, "higher_is_better": result.higher_is_better,
        "interval": result.interval, "axes": [axis.field for axis in result.axes], "points": result.points,
        "best": result.best, "runner_up": result.runner_up, "comparison": result.comparison,
        "failed": result.failed, "runs": result.runs})
    title = f"distill sweep: {directory}"
    atomic_write_text(directory / "sweep.md", f"# {title}\n\n{result.table()}\n\n"
                      + "".join(f"![{p.stem}](plots/{p.name})\n" for p in plots))
    header, body = summary_rows(result)
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in summary_notes(result))
    atomic_write_text(directory / "sweep.html", html_page(title, f"<h1>{html.escape(title)}</h1>"
                      + html_table(header, [[c.replace("**", "") for c in row] for row in body]) + notes
                      + html_images(plots)))


def sweep(recipe, grid: list[str] | dict | None = None, seeds: str | int | list = 3, **options) -> SweepResult:
    """Python API: `distill.sweep("recipe.yaml", {"objective.loss": ["jsd", "forward_kl"]}, seeds=3)`."""
    progress = options.pop("progress", None)
    return Sweep(recipe, grid or {}, seeds, **options).run(progress)
