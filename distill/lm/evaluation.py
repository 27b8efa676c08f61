"""`distill eval` for causal LMs: saved models scored on a recipe's eval data, as a run scores its rows."""
from __future__ import annotations

import time
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.rundir import RunResult
from distill.lm.models import load_causal_lm, quiet_transformers, resolve_model_path
from distill.lm.recipe import LMRecipe
from distill.lm.run import LMSetup
from distill.lm.tasks import TASKS


def lone_model_recipe(model: Path, data: str | None) -> dict:
    """A recipe scoring the saved causal LM `model` alone on `data`: `builtin:<task>` or a data file
    (jsonl / parquet; its rows are the eval set). Its own tokenizer reads the data; nothing trains."""
    if data is None:
        raise DistillError(f"`{model}` does not say which data it was trained on", field="--data",
                           fix=f"pass --data builtin:<task> ({', '.join(TASKS)}) or --data FILE.jsonl, "
                               "or --recipe RECIPE")
    if data.startswith("builtin:"):
        spec = {"builtin": data.removeprefix("builtin:"), "train_size": 1}
    else:
        spec = {"train": data, "eval": data}
    return {"task": "lm", "name": "eval", "teacher": {"path": str(model)}, "student": {"path": str(model)},
            "data": spec}


def evaluate_saved(recipe: LMRecipe, models: dict[str, Path]) -> RunResult:
    """Every metric of each saved model on the recipe's eval data; the recipe's teacher is the `teacher`
    row unless it is one of the models being evaluated."""
    started = time.perf_counter()
    quiet_transformers()
    teacher = (None if recipe.teacher.served  # a served teacher: its row comes from the server
               else Path(resolve_model_path(recipe.teacher.path, "teacher.path")).resolve())
    lone = teacher is not None and any(Path(path).resolve() == teacher for path in models.values())
    setup = LMSetup(recipe, need_teacher=not lone, training=False)
    rows = {} if lone else {"teacher": setup.teacher_row()}
    for row, path in models.items():
        model = load_causal_lm(str(path), "MODEL").eval().to(setup.accelerator.device)
        evaluate = setup.evaluate_on_teacher_tokens if row == "same_tokenizer" else setup.evaluate
        rows[row] = evaluate(model, final=True)
    meta = {**setup.meta(rows), "world_size": 1, "seconds": time.perf_counter() - started}
    return RunResult(None, rows, meta)
