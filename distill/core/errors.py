"""One error type for everything a user can fix: the CLI prints it without a traceback (exit 2).

Anything else that escapes a command is a failure: the CLI prints one line and the path of a log file holding
the traceback (`error.log` in the output directory the command was writing, see `note_output_directory`).
"""
from __future__ import annotations

import errno
from pathlib import Path

_output_directory: list[Path] = []  # the directory the running command writes (the last one noted)


def note_output_directory(path: str | Path | None) -> None:
    """Called when a command starts writing `path` (a run directory, a cache): a failure's log goes there
    (None: forget it, as each command starts)."""
    _output_directory[:] = [Path(path)] if path is not None else []


def output_directory() -> Path | None:
    """The directory the running command started writing, if any."""
    return _output_directory[0] if _output_directory else None


DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "FileTooLarge", "StorageFull")


def disk_full(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is a write that found no space (ENOSPC, EFBIG
    under a file-size limit, EDQUOT); libraries that wrap the OSError (safetensors) are recognised by text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


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
