"""The run directory, one contract for every family, and a run's result.

    recipe.yaml     the resolved recipe, written once, after every check passed
    metrics.jsonl   one line per evaluation during training ({phase, step, metric...}), appended
    losses.jsonl    one line per logged training step ({phase, step, loss...}), appended
    checkpoints/    <phase>/ for --resume (core.checkpoint)
    results.json    {"rows": {row: {metric: value}}, "meta": {...}}, written last: it marks a finished run
    report.md, report.html, plots/   from the one report writer (core.report)
    trackers/       with `log.trackers` (core.trackers): tensorboard event files, wandb offline runs

Never overwrite silently: a finished or unfinished run needs --overwrite (or --resume), and a
directory that is not a distill run is never deleted.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.errors import DistillError, note_output_directory
from distill.core.io import append_jsonl, atomic_write_text, read_jsonl, repair_jsonl, writable_problem
from distill.core.trackers import ExperimentTrackers

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
LOSSES_FILE = "losses.jsonl"
RESULTS_FILE = "results.json"  # written last: its presence marks a finished run
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class RunResult:
    """What a run (or an evaluation) produced: rows of metrics and what they mean (`meta`: task, name,
    primary_metric, higher_is_better, world_size, seconds, recipe, ...)."""

    run_dir: Path | None
    rows: dict[str, dict]
    meta: dict = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return self.meta["primary_metric"]

    @property
    def higher_is_better(self) -> bool:
        return bool(self.meta.get("higher_is_better", False))

    def table(self) -> str:
        """The rows as a markdown table, with the notes under it."""
        from distill.core.report import format_table

        return format_table(self.rows, self.meta)

    def stamp(self, recipe) -> None:
        """Record the recipe it came from in `meta` (task, name, the resolved recipe), unless already there."""
        self.meta.setdefault("task", recipe.task)
        self.meta.setdefault("name", recipe.name)
        self.meta.setdefault("recipe", recipe.model_dump(mode="json"))

    def to_json(self) -> dict:
        return {"rows": self.rows, "meta": self.meta}

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResult:
        """The result a finished run wrote (results.json)."""
        run_dir = Path(run_dir)
        file = run_dir / RESULTS_FILE
        if not file.is_file():
            raise DistillError(f"`{run_dir}` holds no finished run (no {RESULTS_FILE})", field="RUN",
                               fix="give the output directory of a run that completed")
        data = json.loads(file.read_text())
        if "meta" not in data:  # written before the `meta` section existed: everything but rows was top-level
            data = {"rows": data["rows"], "meta": {k: v for k, v in data.items() if k != "rows"}}
        return cls(run_dir, data["rows"], data["meta"])


class RunDirectory:
    """A run's directory: checked before anything is written, started once the recipe is valid and the
    family has loaded everything, then logs, checkpoints and the report."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.is_main = True
        self.recipe_changes: list[str] = []
        self.trackers: ExperimentTrackers | None = None

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def losses_file(self) -> Path:
        return self.path / LOSSES_FILE

    def checkpoint_dir(self, phase: str) -> Path:
        return self.path / CHECKPOINTS_DIR / phase

    def holds_run(self) -> bool:
        return (self.path / RECIPE_FILE).is_file()

    def check(self) -> None:
        """Refuse what would overwrite something silently, or could not be written. Writes nothing (a probe
        file is created and removed to learn whether the directory takes files)."""
        path = self.path
        problem = writable_problem(path)
        if problem is not None:
            raise DistillError(f"the run directory `{path}` cannot be written: {problem}", field="output",
                               fix="choose a writable output directory (output: or --set output=DIR)")
        if not path.exists() or not any(path.iterdir()) or self._only_leftovers():
            return
        if not path.is_dir():
            raise DistillError(f"`{path}` is a file", field="output", fix="choose a directory")
        if self.overwrite:
            if not self.holds_run():
                raise DistillError(f"`{path}` is not empty and is not a distill run; refusing to delete it",
                                   field="output", fix="choose another output directory")
            return
        if self.resume:
            if not self.holds_run():
                raise DistillError(f"`{path}` holds no run to resume", field="output", fix="run without --resume")
            return
        if (path / RESULTS_FILE).is_file():
            raise DistillError(f"`{path}` holds a finished run", field="output",
                               fix="pass --overwrite to replace it, or set output to a new directory")
        raise DistillError(f"`{path}` holds an unfinished run" if self.holds_run() else f"`{path}` is not empty",
                           field="output", fix="pass --resume to continue it, --overwrite to start again, "
                                               "or choose another output directory")

    def _only_leftovers(self) -> bool:
        """The directory holds nothing but a staged recipe.yaml.tmp and failure logs (error.log, error-rank<r>.log):
        a run killed or failed before its recipe was written, which starts afresh (with or without --resume)."""
        return self.path.is_dir() and all(p.name == RECIPE_FILE + ".tmp" or (p.name.startswith("error")
                                                                            and p.name.endswith(".log"))
                                          for p in self.path.iterdir())

    def start(self, recipe, *, is_main: bool = True) -> None:
        """After every check: clear an overwritten run, create the directory, write recipe.yaml (a resumed
        run keeps the one it started with; a changed recipe is warned about and recorded in `meta`), then
        open the recipe's `log.trackers`."""
        self.is_main = is_main
        note_output_directory(self.path)  # every process: a failure's log goes there (error-rank<r>.log)
        if not is_main:
            return
        if self.overwrite and self.holds_run():
            shutil.rmtree(self.path)
        if self._only_leftovers():
            (self.path / (RECIPE_FILE + ".tmp")).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        saved = self.path / RECIPE_FILE
        if self.resume:
            for file in (self.metrics_file, self.losses_file):
                repair_jsonl(file)
        if self.resume and saved.is_file():
            self.recipe_changes = recipe_differences(saved.read_text(), recipe.to_yaml())
            if self.recipe_changes:
                warnings.warn("resuming with a recipe that differs from the saved one: "
                              + "; ".join(self.recipe_changes), stacklevel=2)
        else:
            atomic_write_text(saved, recipe.to_yaml())
        if getattr(recipe, "log", None) is not None and recipe.log.trackers:
            self.trackers = ExperimentTrackers.open(recipe, self.path)

    # ---- logs ------------------------------------------------------------------------------------

    def log_metrics(self, record: dict) -> None:
        """One eval record: metrics.jsonl, and the trackers as `<phase>/eval/<metric>`."""
        if self.is_main:
            append_jsonl(self.metrics_file, record)
            if self.trackers is not None:
                self.trackers.log(record, evaluation=True)

    def log_losses(self, record: dict) -> None:
        """One training record: losses.jsonl, and the trackers as `<phase>/<key>`."""
        if self.is_main:
            append_jsonl(self.losses_file, record)
            if self.trackers is not None:
                self.trackers.log(record)

    def rewind(self, phase: str, step: int) -> None:
        """Resuming `phase` from its step-`step` checkpoint: drop its log lines written after that step
        (they are written again), keep every other line."""
        if not self.is_main:
            return
        for file in (self.metrics_file, self.losses_file):
            if not file.exists():
                continue
            lines = file.read_text().splitlines()
            kept = [line for line in lines if line.strip() and not _after(json.loads(line), phase, step)]
            if len(kept) != len(lines):
                atomic_write_text(file, "".join(line + "\n" for line in kept))

    def history(self, phase: str) -> list[dict]:
        """The eval records of `phase` so far."""
        return [r for r in read_jsonl(self.metrics_file) if r.get("phase") == phase]

    # ---- the end ----------------------------------------------------------------------------------

    def finish(self, result: RunResult, figures=None) -> None:
        """Write the report (core.report); results.json last; close the trackers."""
        from distill.core.report import write_report

        if self.recipe_changes:
            result.meta["recipe_changes_on_resume"] = self.recipe_changes
        if self.is_main:
            write_report(self.path, result, figures)
        self.close_trackers()

    def close_trackers(self, *, failed: bool = False) -> None:
        """Finish the trackers (once; also when a run fails, so that a later run in this process starts fresh)."""
        if self.trackers is not None:
            self.trackers.close(failed=failed)
            self.trackers = None


def _after(record: dict, phase: str, step: int) -> bool:
    return record.get("phase") == phase and record.get("step", 0) > step


def recipe_differences(saved_yaml: str, current_yaml: str) -> list[str]:
    """`field: old -> new` for every leaf that differs between two resolved recipes."""
    import yaml

    def flat(data, prefix=""):
        for key, value in (data or {}).items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    # `output` is where the run is, not how it runs: a moved run directory resumes without a warning.
    before, after = dict(flat(yaml.safe_load(saved_yaml))), dict(flat(yaml.safe_load(current_yaml)))
    before.pop("output", None), after.pop("output", None)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)]
