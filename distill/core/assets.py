"""The models shipped inside the package (`distill/assets/<name>`), named `builtin:<name>` in recipes."""
from __future__ import annotations

from pathlib import Path

from distill.core.errors import DistillError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PREFIX = "builtin:"


def builtin_model(path: str, marker: str, field: str, *, train_command: str | None = None) -> Path | None:
    """`builtin:<name>` -> the directory of the shipped model `<name>` (refused, with the command that
    builds it, when this installation lacks it: `marker` is the file a complete one holds); None when
    `path` does not start with `builtin:`."""
    if not path.startswith(PREFIX):
        return None
    name = path.removeprefix(PREFIX)
    local = ASSETS / name
    if not (local / marker).is_file():
        command = train_command or f"builtin:{name.removesuffix('-teacher')}"
        raise DistillError(f"built-in model `{name}` is not in this installation ({local})", field=field,
                           fix=f"build it with `distill train-teacher {command} --out {local}`")
    return local
