"""Built-in tasks with exact ground truth (DESIGN.md, "Built-in tasks").

A task makes a tokenizer, seeded train/eval records in the same shapes as user data
(`text` or `prompt`+`completion`), a default model shape, and its own exact metric.
"""
from __future__ import annotations

from distill.core.errors import DistillError
from distill.lm.tasks.arithmetic import ArithmeticTask
from distill.lm.tasks.oracle import OracleTask

TASKS = {"oracle": OracleTask, "arithmetic": ArithmeticTask}


def get_task(name: str):
    """A fresh task object by name (`oracle`, `arithmetic`)."""
    if name not in TASKS:
        raise DistillError(f"no built-in task `{name}`", field="data.builtin", fix=f"use one of: {', '.join(TASKS)}")
    return TASKS[name]()
