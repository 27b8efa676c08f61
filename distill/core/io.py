"""Files that survive a crash: every write is staged, fsynced and renamed into place, so a reader (or
a resumed run) sees either the old content or the new one, never half of either."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a staging file, fsync, rename, fsync of the directory."""
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@contextmanager
def staged_directory(directory: str | Path, *, keep_previous: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory next to `directory`; when the block ends without error, every
    file in it is fsynced and it replaces `directory` (the previous version stays whole until then, as
    `<name>.previous`: `recover_directory` puts it back if a crash falls between the renames). With
    `keep_previous` the previous version stays there afterwards too (checkpoints: a damaged newest one
    falls back to it); otherwise it is deleted once the new one is in place."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".tmp")
    previous = previous_version(directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    for file in staging.rglob("*"):
        if file.is_file():
            fsync_path(file)
    fsync_path(staging)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(staging, directory)
    fsync_path(directory.parent)
    if not keep_previous:
        shutil.rmtree(previous, ignore_errors=True)


def previous_version(directory: str | Path) -> Path:
    """Where `staged_directory` keeps the version it replaced."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".previous")


def recover_directory(directory: str | Path, complete_marker: str) -> Path | None:
    """`directory` if it holds `complete_marker`; else its previous version put back (a crash between the two
    renames of `staged_directory`); else None."""
    directory = Path(directory)
    if (directory / complete_marker).is_file():
        return directory
    previous = previous_version(directory)
    legacy = directory.with_name(directory.name + ".old")  # the name before keep_previous existed
    for candidate in (previous, legacy):
        if (candidate / complete_marker).is_file():
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(candidate, directory)
            return directory
    return None


def writable_problem(path: str | Path) -> str | None:
    """Why nothing can be written at `path` (a directory that may not exist yet), None if a file can be: a
    probe file is created and removed in `path`, or in its nearest existing parent (read-only file systems,
    permissions, a file in the way, a full disk)."""
    path = Path(path).absolute()
    probe_in = path
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return f"`{probe_in}` is a file, not a directory"
    try:
        descriptor, name = tempfile.mkstemp(prefix=".distill-probe-", dir=probe_in)
        os.close(descriptor)
        os.unlink(name)
    except OSError as error:
        return f"cannot write in `{probe_in}`: {error.strerror or error}"
    return None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a jsonl file ([] if it does not exist); an unterminated last line (a write cut short by a
    full disk) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def repair_jsonl(path: str | Path) -> bool:
    """Cut an unterminated last line (a write cut short by a full disk or a kill) off a jsonl file, so that the
    next append starts a line of its own; whether anything was cut."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])
    return True


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as a line (flushed: a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
