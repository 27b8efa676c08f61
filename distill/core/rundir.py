"""The run directory and a run's result, shared by every task (light: no transformers import).

Never overwrite silently: a finished or unfinished run needs --overwrite (or --resume)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.report import format_table

FINISHED_MARKER = "results.json"


@dataclass
class RunResult:
    """What a run produced: the three rows of metrics and where everything was written."""

    run_dir: Path
    rows: dict[str, dict]
    primary_metric: str
    higher_is_better: bool
    extras: dict = field(default_factory=dict)

    def table(self) -> str:
        return format_table(self.rows, self.primary_metric, self.higher_is_better)

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunResult":
        results = json.loads((Path(run_dir) / FINISHED_MARKER).read_text())
        return cls(Path(run_dir), results["rows"], results["primary_metric"], results["higher_is_better"],
                   {k: v for k, v in results.items() if k not in ("rows", "primary_metric", "higher_is_better")})


def prepare_output_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Never overwrite silently: a finished or unfinished run needs --overwrite (or --resume)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    is_run = (run_dir / "recipe.yaml").is_file()
    if overwrite:
        if not is_run:
            raise DistillError(f"`{run_dir}` is not empty and is not a distill run; refusing to delete it",
                               field="output", fix="choose another output directory")
        if is_main:
            shutil.rmtree(run_dir)
        return
    if resume:
        if not is_run:
            raise DistillError(f"`{run_dir}` holds no run to resume", field="output", fix="run without --resume")
        return
    if (run_dir / FINISHED_MARKER).is_file():
        raise DistillError(f"`{run_dir}` holds a finished run", field="output",
                           fix="pass --overwrite to replace it, or set output to a new directory")
    raise DistillError(f"`{run_dir}` holds an unfinished run" if is_run else f"`{run_dir}` is not empty",
                       field="output", fix="pass --resume to continue it, --overwrite to start again, "
                                           "or choose another output directory")
