"""The run skeleton every family goes through, so that all of them check, write, resume and report
the same way:

    the run directory and the recipe's trackers (log.trackers installed?) are checked (nothing written)
    -> prepare(run_dir): the family loads data and models and checks everything (nothing written)
    -> run_dir.start(recipe): an overwritten run cleared, recipe.yaml written (once)
    -> job.run(run_dir): training (resuming from checkpoints if asked) and evaluation -> RunResult
    -> run_dir.finish(result): the one report writer; results.json last; trackers closed (also on failure)
"""
from __future__ import annotations

from collections.abc import Callable

from distill.core.families import Job, get_family
from distill.core.recipe import RunRecipe
from distill.core.rundir import RunDirectory, RunResult
from distill.core.trackers import check_trackers


def run_recipe(recipe: RunRecipe, *, resume: bool = False, overwrite: bool = False) -> RunResult | None:
    """Run a validated recipe through its family; the RunResult (None on processes other than the main one)."""
    if getattr(recipe, "assistants", None):  # a teacher chain: stages, then this run (core.chain)
        from distill.core.chain import run_chain

        return run_chain(recipe, lambda stage, again: run_recipe(stage, resume=again), resume=resume,
                         overwrite=overwrite)
    family = get_family(recipe.task)
    return run_job(recipe, lambda run_dir: family.prepare(recipe, run_dir), resume=resume, overwrite=overwrite)


def run_job(recipe: RunRecipe, prepare: Callable[[RunDirectory], Job], *, resume: bool = False,
            overwrite: bool = False) -> RunResult | None:
    """The skeleton around `prepare(run_dir) -> Job`, for recipes and for Python APIs that build their job
    from objects (`distill.distill_classifier`); `recipe` is what recipe.yaml records."""
    run_dir = RunDirectory(recipe.output_dir, resume=resume, overwrite=overwrite)
    run_dir.check()
    check_trackers(recipe)
    job = prepare(run_dir)
    run_dir.start(recipe, is_main=job.is_main)
    try:
        result = job.run(run_dir)
        if job.is_main:
            result.stamp(recipe)
            run_dir.finish(result, job.figures)
    finally:
        run_dir.close_trackers(failed=True)  # a no-op after finish() closed them
    job.close()
    return result if job.is_main else None
