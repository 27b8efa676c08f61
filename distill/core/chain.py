"""Teacher chains (TAKD, Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant"):
a recipe with `assistants: [A1, A2, ...]` distills teacher -> A1 -> A2 -> ... -> student in one command.

    RUN/stages/1-assistant/   a normal run: `teacher` into A1 (no `alone` row)
    RUN/stages/2-assistant/   A1 (its saved student) into A2
    RUN/                      the last assistant into the recipe's student: the run the recipe names

Every stage uses the recipe's data, objective, regime, train and eval settings; only the teacher and
the student change. RUN/recipe.yaml is the chain's recipe; the report's rows are the top teacher,
each assistant (its stage's `distilled` row) and the final `alone` and `distilled` rows, all scored on
the same evaluation data. A killed chain continues with --resume: finished stages are kept, the
interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.families import get_family
from distill.core.recipe import RunRecipe, load_recipe
from distill.core.rundir import RESULTS_FILE, RunDirectory, RunResult
from distill.core.trackers import check_trackers

STAGES_DIR = "stages"


def stage_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / STAGES_DIR / f"{index}-assistant"


def stage_recipe(recipe: RunRecipe, index: int, teacher_dir: Path | None, student: dict | None = None) -> RunRecipe:
    """Stage `index` (1-based; len(assistants) + 1 is the final one) of a chain recipe, as a plain recipe."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    assistants = data.pop("assistants")
    final = index > len(assistants)
    if teacher_dir is not None:
        data["teacher"] = {"path": str(teacher_dir)}
    if not final:
        data["student"] = student if student is not None else assistants[index - 1]
        data["train"] = {**data.get("train", {}), "baseline": False}  # an assistant needs no `alone` twin
        data["name"] = f"{recipe.name}-assistant-{index}"
        data["output"] = str(stage_dir(recipe.output_dir, index))
        data.pop("log", None)  # trackers follow the chain's own run
    return load_recipe(data)


def run_chain(recipe: RunRecipe, run_stage: Callable[[RunRecipe, bool], RunResult], *, resume: bool = False,
              overwrite: bool = False) -> RunResult:
    """Run every stage of a chain recipe with `run_stage(stage_recipe, resume)` (core.run's run_recipe), then
    the final one in the recipe's output directory."""
    family = get_family(recipe.task)
    run_dir = RunDirectory(recipe.output_dir, resume=resume, overwrite=overwrite)
    run_dir.check()
    check_trackers(recipe)
    count = len(recipe.assistants)
    for index in range(1, count + 2):  # every stage's recipe is valid before anything is written
        stage_recipe(recipe, index, None if index == 1 else Path("."))
    run_dir.start(recipe)
    stages, teacher_dir = [], None
    try:
        for index in range(1, count + 1):
            stage = stage_recipe(recipe, index, teacher_dir)
            directory = stage.output_dir
            if (directory / RESULTS_FILE).is_file():
                result = RunResult.load(directory)
            else:
                result = run_stage(stage, RunDirectory(directory).holds_run())
            stages.append(result)
            saved = family.saved_models(directory)
            if "distilled" not in saved:
                raise DistillError(f"stage {index} saved no student in `{directory}`", field=f"assistants.{index - 1}",
                                   fix="rerun with --resume")
            teacher_dir = saved["distilled"]
        final = stage_recipe(recipe, count + 1, teacher_dir)
        job = family.prepare(final, run_dir)
        result = job.run(run_dir)
        if job.is_main:
            first = stages[0].rows if stages else {}
            rows = {"teacher": first.get("teacher", result.rows.get("teacher", {}))}
            for index, stage in enumerate(stages, 1):
                rows[f"assistant {index}"] = stage.rows.get("distilled", {})
            rows.update({name: row for name, row in result.rows.items() if name != "teacher"})
            result.rows = rows
            result.meta["chain"] = [{"stage": index, "run": str(stage.run_dir), "student": assistant}
                                    for index, (stage, assistant) in enumerate(
                                        zip(stages, recipe.model_dump(mode="json")["assistants"]), 1)]
            result.meta["rows_note"] = (result.meta.get("rows_note", "") + " A teacher chain: `assistant k` is the "
                                        "k-th teaching assistant, distilled from the model above it; the student "
                                        "learned from the last.").strip()
            result.stamp(recipe)
            run_dir.finish(result, job.figures)
    finally:
        run_dir.close_trackers(failed=True)
    job.close()
    return result if job.is_main else None
