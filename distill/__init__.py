"""distill: turn a large teacher model into a small, fast student.

    import distill
    result = distill.run("recipe.yaml")      # or distill.run(distill.Recipe(...))
    print(result.table())                     # teacher / alone / distilled rows
"""
from __future__ import annotations

__version__ = "0.1.0"

from distill.core.errors import DistillError
from distill.lm.recipe import Recipe, load_recipe

__all__ = ["DistillError", "Recipe", "RunResult", "distill_classifier", "load_recipe", "run", "train_teacher",
           "__version__"]


def run(recipe, overrides=(), *, resume: bool = False, overwrite: bool = False):
    """Run a recipe (path, `builtin:<name>`, dict or Recipe): distill its teacher into its student,
    write the run directory and return the RunResult (teacher / alone / distilled rows)."""
    recipe = load_recipe(recipe, overrides)
    if recipe.task == "classifier":  # no transformers import on this path
        from distill.classifier.run import run_classifier
        return run_classifier(recipe, resume=resume, overwrite=overwrite)
    if recipe.task == "diffusion":
        from distill.diffusion.run import run_diffusion
        return run_diffusion(recipe, resume=resume, overwrite=overwrite)
    from distill.lm.run import run as run_lm
    return run_lm(recipe, resume=resume, overwrite=overwrite)


def __getattr__(name: str):
    # The heavy imports (transformers, accelerate) wait until a run is asked for.
    if name == "RunResult":
        from distill.core.rundir import RunResult
        return RunResult
    if name == "distill_classifier":
        from distill.classifier.run import distill_classifier
        return distill_classifier
    if name == "train_teacher":
        from distill.lm.train_teacher import train_teacher
        return train_teacher
    raise AttributeError(name)
