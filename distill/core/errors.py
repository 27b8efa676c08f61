"""One error type for everything a user can fix: the CLI prints it without a traceback (exit 2)."""
from __future__ import annotations


class DistillError(Exception):
    """A problem the user can fix. `field` is the recipe path (e.g. `train.lr`), `fix` says how."""

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        self.message = message
        self.field = field
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.field}: {self.message}" if self.field else self.message
        return f"{head}\n  fix: {self.fix}" if self.fix else head


class InterruptedRun(DistillError):
    """Something outside the run failed mid-way (e.g. a served teacher stopped answering): what was
    checkpointed is kept, and `--resume` continues once the cause is fixed."""


class FieldValueError(ValueError):
    """A recipe validator's complaint about one field below the model it validates (`field`, dotted),
    so that the error names e.g. `objective.beta` rather than just `objective`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
