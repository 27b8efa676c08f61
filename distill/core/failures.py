"""What a command says when it fails with something that is not a `DistillError`: one line naming the
failure (a full disk, a peer process of a multi-process run that went away, or anything else), the path of
a log file holding the traceback, and how the run directory continues. The CLI prints the lines."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from pathlib import Path

from distill.core.errors import disk_full, output_directory

LOG_FILE = "error.log"
# What a failed collective says when a peer went away (gloo / NCCL connection errors, c10d, a timeout).
_COLLECTIVE_MARKERS = ("DistBackendError", "DistNetworkError", "gloo", "NCCL", "c10d", "Connection reset by peer",
                       "Connection closed by peer", "Broken pipe", "timed out")


def _rank() -> str | None:
    """This process's rank in a multi-process run (None in a single-process run)."""
    return os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None


def collective_failure(error: BaseException) -> bool:
    """Whether a multi-process run's error is a collective that failed because a peer went away."""
    text = f"{type(error).__name__}: {error}"
    return _rank() is not None and any(marker in text for marker in _COLLECTIVE_MARKERS)


def write_log(text: str) -> Path:
    """`text` appended to `error.log` (`error-rank<r>.log` on the other ranks) of the directory the command was
    writing, else to a file under the temp directory (also when that directory cannot take it: a full disk)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = f"--- {stamp} distill {' '.join(sys.argv[1:])}\n{text}\n"
    rank = _rank() or "0"
    name = LOG_FILE if rank == "0" else LOG_FILE.replace(".log", f"-rank{rank}.log")
    candidates = [output_directory() / name] if output_directory() is not None else []
    candidates.append(Path(tempfile.gettempdir()) / "distill-logs" / f"distill-{stamp}-{os.getpid()}.log")
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(record)
            return path
        except OSError:
            if path.is_file() and path.stat().st_size == 0:
                path.unlink(missing_ok=True)  # created, but the disk took nothing
    return candidates[-1]


def describe_failure(error: BaseException, *, debug: bool) -> tuple[list[str], str]:
    """(the lines to print, the traceback text) for `error`; the traceback is written to the log first."""
    text = "".join(traceback.format_exception(error))
    log = write_log(text)
    directory = output_directory()
    message = str(error).strip()
    summary = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
    summary = summary if len(summary) <= 300 else summary[:300] + "..."
    if collective_failure(error):
        lines = [f"rank {_rank()}: another process of this run stopped, so the collective operation this one "
                 f"waited on failed ({summary[:160]}). Its own error, if it had one, is in its output above",
                 f"traceback: {log}"]
        if directory is not None:
            lines.append(f"the run directory `{directory}` keeps its last checkpoint: launch the same command "
                         "again with --resume to continue")
        return lines, text
    if disk_full(error):
        where = directory or Path(getattr(error, "filename", None) or ".").parent
        head = (f"the disk holding `{where}` is full (or a file-size limit was reached): {summary}. What was "
                "written before is intact (checkpoints are swapped in only when complete)")
    else:
        head = f"unexpected failure: {summary}"
    lines = [head, f"traceback: {log}" + ("" if debug else " (or run with `distill --debug`)")]
    if directory is not None and (directory / "recipe.yaml").is_file():
        lines.append(f"the run directory `{directory}` keeps its checkpoints: `distill run RECIPE --resume` "
                     "continues it, `--overwrite` starts again")
    return lines, text
