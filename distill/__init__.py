"""distill: turn a large teacher model into a small, fast student.

    import distill
    result = distill.run("recipe.yaml")      # or distill.run({...}) / distill.run(distill.Recipe(...))
    print(result.table())                     # teacher / alone / distilled rows

The three model families live in their own packages on a shared core (docs/architecture.md):
`distill.lm` (causal LMs), `distill.classifier` (any nn.Module classifier), `distill.diffusion`
(few-step denoisers); `distill.losses` holds the objectives, pure functions over tensors.
"""
from __future__ import annotations

__version__ = "0.1.0"

from distill.core.errors import DistillError
from distill.core.families import register_family
from distill.core.recipe import load_recipe

# Each family's package is imported only when a recipe of its task is read.
register_family("lm", "distill.lm")
register_family("classifier", "distill.classifier")
register_family("diffusion", "distill.diffusion")

__all__ = ["DistillError", "Recipe", "RunResult", "compare", "distill_classifier", "evaluate", "load_recipe", "run",
           "sweep", "train_teacher", "__version__"]


def run(recipe, overrides=(), *, resume: bool = False, overwrite: bool = False):
    """Run a recipe (path, `builtin:<name>`, dict or recipe object): distill its teacher into its student,
    write the run directory and return the RunResult (rows + meta)."""
    from distill.core.run import run_recipe

    return run_recipe(load_recipe(recipe, overrides), resume=resume, overwrite=overwrite)


def __getattr__(name: str):
    # The heavy imports (torch, transformers, accelerate) wait until they are asked for.
    if name == "Recipe":  # the causal-LM recipe (task: lm), the default task
        from distill.lm.recipe import LMRecipe
        return LMRecipe
    if name == "RunResult":
        from distill.core.rundir import RunResult
        return RunResult
    if name == "distill_classifier":
        from distill.classifier.api import distill_classifier
        return distill_classifier
    if name == "train_teacher":
        from distill.lm.train_teacher import train_teacher
        return train_teacher
    if name == "sweep":
        from distill.core.sweep import sweep
        return sweep
    if name in ("evaluate", "compare"):
        from distill.core import evaluation
        return getattr(evaluation, name)
    raise AttributeError(name)
