"""distill: turn a large teacher model into a small, fast student.

    import distill
    result = distill.run("recipe.yaml")      # or distill.run(distill.Recipe(...))
    print(result.table())                     # teacher / alone / distilled rows
"""
from __future__ import annotations

__version__ = "0.1.0"

from distill.errors import DistillError
from distill.recipe import Recipe, load_recipe

__all__ = ["DistillError", "Recipe", "RunResult", "distill_classifier", "load_recipe", "run", "train_teacher",
           "__version__"]


def __getattr__(name: str):
    # The heavy imports (transformers, accelerate) wait until a run is asked for.
    if name in ("run", "RunResult"):
        from distill import pipeline as run_module
        return getattr(run_module, name)
    if name == "distill_classifier":
        from distill.classifier.run import distill_classifier
        return distill_classifier
    if name == "train_teacher":
        from distill.teacher.train import train_teacher
        return train_teacher
    raise AttributeError(name)
