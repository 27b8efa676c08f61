"""Rows from your files: .jsonl / .json / .parquet, or a Hugging Face dataset (a `save_to_disk` directory, data
files such as csv, a dataset script or a hub id), each row checked before anything is tokenized, and where each
came from (the file and the row's line), so that every problem names the file and the line to fix."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.recipe import encodable, shown

FIELD_NAMES = ("prompt", "completion", "text", "messages", "id", "chosen", "rejected")  # what data.fields may map
DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (DatasetDict / Dataset)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ROW_SHAPES = "an object with `prompt`+`completion`, `text`, or `messages`"


@dataclass(frozen=True)
class RowOrigin:
    """Where a list of rows came from, for messages: a file or dataset, and each row's line in it (jsonl) or
    its index from `first` on."""

    path: str
    lines: tuple[int, ...] | None = None  # jsonl: the line of each row (blank lines skipped)
    first: int = 0  # the index in the file of the list's first row (eval rows split off a file's end)

    def row(self, index: int) -> str:
        """`path` line 7 (jsonl), else `path` row 6 (its index in the file or split, from 0)."""
        if self.lines is not None:
            return f"`{self.path}` line {self.lines[self.first + index]}"
        return f"`{self.path}` row {self.first + index}"

    def after(self, count: int) -> "RowOrigin":
        """The origin of the rows from index `count` on."""
        return replace(self, first=self.first + count)


def read_records(path: str, field: str, split: str | None = None, fields: dict[str, str] | None = None,
                 split_field: str = "data.split") -> list[dict]:
    """Rows as dicts, from a .jsonl / .json (list) / .parquet file or a Hugging Face dataset (a
    `save_to_disk` directory, a local dataset script or data directory, other data files, or a hub id)
    taken at `split`; `fields` maps our field names to the data's columns (e.g. {prompt: instruction}).
    Every row is checked (`row_problem`): a DistillError names the file and the row's line or index."""
    return read_rows(path, field, split, fields, split_field)[0]


def read_rows(path: str, field: str, split: str | None = None, fields: dict[str, str] | None = None,
              split_field: str = "data.split", problem=None, fix=None) -> tuple[list[dict], RowOrigin]:
    """`read_records` and where each row came from. `problem` / `fix`: another check of each row and its fix
    (default `row_problem` / `row_fix`; preference pairs have their own)."""
    problem, fix = problem or row_problem, fix or row_fix
    file = Path(path).expanduser()
    if file.is_file() and file.suffix in FILE_SUFFIXES:
        rows, lines = _read_file(path, field)
    else:
        rows, lines = _read_dataset(path, field, split, split_field), None
    if not rows:
        raise DistillError(f"`{path}` has no rows", field=field, fix="give a file with at least one row")
    rows = _map_fields(rows, fields, path) if fields else rows
    origin = RowOrigin(path, lines)
    for index, row in enumerate(rows):
        found = problem(row)
        if found is not None:
            raise DistillError(f"{origin.row(index)}: {found}", field=field, fix=fix(found) + (
                " (data.fields maps our fields to your columns)" if fields else ""))
    return rows, origin


def row_problem(record) -> str | None:
    """What keeps `record` from being a row (None: nothing): an object with `messages` (a non-empty list of
    {role, content}, both strings), or `prompt` + `completion`, or `text`, those being text (numbers and
    booleans are taken as their text; null, lists and objects are refused rather than trained on as `None`)."""
    if not isinstance(record, dict):
        return f"the row is a {type(record).__name__}, not an object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            return "`messages` must be a non-empty list of {role, content}"
        for number, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message[key], str) or not encodable(message[key]):
                    return f"`messages` {number}: `{key}` is {shown(message[key])}, not a string" + (
                        " of valid text (a lone surrogate)" if isinstance(message[key], str) else "")
        return None
    if "prompt" in record and "completion" in record:
        keys = ("prompt", "completion")
    elif "text" in record:
        keys = ("text",)
    else:
        pair = {"chosen", "rejected"} <= record.keys()
        pairs = " (a preference pair: regime.kind preference reads those)" if pair else ""
        return (f"the row has keys {sorted(map(str, record))}; expected `prompt`+`completion`, `text`, or "
                f"`messages`{pairs}")
    for key in keys:
        if not isinstance(record[key], (str, int, float, bool)):
            return f"`{key}` is {shown(record[key])}, not text"
        if isinstance(record[key], str) and not encodable(record[key]):  # a "\ud800" escape: tokenizers refuse it
            return f"`{key}` is {shown(record[key])}, not valid text (a lone surrogate)"
    return None


def row_fix(problem: str) -> str:
    """The fix of a `row_problem`."""
    if "`messages`" in problem:
        return 'give `messages` as a list of {role, content} strings, e.g. [{"role": "user", "content": "hi"}, ' \
               '{"role": "assistant", "content": "hello"}]'
    return f"each row is {ROW_SHAPES}"


def _read_dataset(path: str, field: str, split: str | None, split_field: str) -> list[dict]:
    """A Hugging Face dataset's split as a list of dicts (datasets' own loaders, no conversion script)."""
    try:
        import datasets
    except ImportError:
        raise DistillError("reading a Hugging Face dataset needs `datasets`", field=field,
                           fix="pip install datasets") from None
    location = Path(path).expanduser()
    try:
        if location.is_dir() and any((location / marker).is_file() for marker in DATASET_MARKERS):
            try:
                loaded = datasets.load_from_disk(str(location))
            except (KeyError, TypeError, AttributeError, IndexError) as error:  # its json files parse, to nonsense
                raise DistillError(f"`{path}` is a save_to_disk directory whose files are damaged "
                                   f"({type(error).__name__}: {_reason(error)})", field=field,
                                   fix="write it again with Dataset.save_to_disk / DatasetDict.save_to_disk") from None
        elif location.is_file():  # csv, tsv, arrow, txt...: data files by their suffix
            kind = {".csv": "csv", ".tsv": "csv", ".txt": "text", ".arrow": "arrow"}.get(location.suffix)
            if kind is None:
                raise DistillError(f"`{path}` is not a data file distill reads ({location.suffix or 'no suffix'})",
                                   field=field, fix="use .jsonl, .json, .parquet, .csv, or a Hugging Face dataset")
            loaded = datasets.load_dataset(kind, data_files=str(location), **({"delimiter": "\t"} if
                                                                               location.suffix == ".tsv" else {}))
        elif location.is_dir() or (not path.startswith((".", "/", "~")) and path.count("/") <= 1):
            loaded = datasets.load_dataset(str(location) if location.is_dir() else path)  # script, files, hub id
        else:
            raise DistillError(f"no data file or dataset at `{path}`", field=field,
                               fix="check the path (relative to the current directory)")
    except DistillError:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetsError) as error:
        raise DistillError(f"`{path}` is not a dataset distill can read: {_reason(error)}", field=field,
                           fix="give a directory written by save_to_disk, a dataset script or data directory, "
                               "data files, or a hub id reachable from here (this machine may be offline)") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(loaded)
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise DistillError(f"`{path}` has no split `{chosen}`; its splits: {', '.join(splits)}",
                               field=split_field, fix=f"set {split_field} to one of: {', '.join(splits)}")
        loaded = loaded[chosen]
    return list(loaded.to_list()) if hasattr(loaded, "to_list") else [dict(row) for row in loaded]


def _reason(error: BaseException) -> str:
    """The first line of what went wrong: the innermost cause (datasets wraps a csv reader's UnicodeDecodeError
    or parser error in a DatasetGenerationError that says only that an error occurred)."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _map_fields(rows: list[dict], fields: dict[str, str], path: str) -> list[dict]:
    """Rows with the data's columns renamed to our field names (`data.fields`: ours -> theirs)."""
    columns = sorted({key for row in rows[:1000] if isinstance(row, dict) for key in row})
    missing = {ours: theirs for ours, theirs in fields.items() if theirs not in columns}
    if missing:
        wrong = ", ".join(f"{ours}: {theirs}" for ours, theirs in missing.items())
        raise DistillError(f"`{path}` has no column for {wrong}; its columns: {', '.join(columns)}",
                           field="data.fields", fix="map each field to one of the columns that exist")
    renamed = {theirs: ours for ours, theirs in fields.items()}

    def mapped(row):  # a column already named like a mapped field gives way to the mapped one
        if not isinstance(row, dict):
            return row
        return {renamed.get(key, key): value for key, value in row.items() if key in renamed or key not in fields}
    return [mapped(row) for row in rows]


def _read_file(path: str, field: str) -> tuple[list, tuple[int, ...] | None]:
    """Rows of a .jsonl / .json (list) / .parquet file, and (jsonl) the line of each."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistillError(f"no data file at `{path}`", field=field, fix="check the path (relative to the current directory)")
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DistillError("reading parquet needs pyarrow", field=field, fix="pip install pyarrow") from None
        try:
            return pq.read_table(file).to_pylist(), None
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DistillError(f"`{path}` is not a readable parquet file: {_reason(error)}",
                               field=field, fix="write it with pyarrow/pandas `to_parquet`") from None
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DistillError(f"`{path}` is not UTF-8 text ({error.reason} at byte {error.start})", field=field,
                           fix="use .parquet for binary data, or save the file as UTF-8") from None
    if file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DistillError(f"`{path}` is not JSON: {error.msg} at line {error.lineno}, column {error.colno}",
                               field=field, fix="use a JSON list of objects, or jsonl (one object per line)") from None
        except RecursionError:
            raise DistillError(f"`{path}` nests lists or objects deeper than the JSON reader follows",
                               field=field, fix="use a JSON list of flat objects") from None
        if not isinstance(rows, list):
            raise DistillError(f"`{path}` holds a {type(rows).__name__}, not a list of rows", field=field,
                               fix="use a JSON list of objects, or jsonl (one object per line)")
        return rows, None
    rows, lines = [], []
    # Lines end at \n only: str.splitlines would also cut at U+2028 and other separators JSON strings may hold.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DistillError(f"`{path}` line {number} is not JSON: {error.msg}", field=field,
                                   fix="write one JSON object per line") from None
            except RecursionError:
                raise DistillError(f"`{path}` line {number} nests lists or objects deeper than the JSON reader "
                                   "follows", field=field, fix="write one flat JSON object per line") from None
            lines.append(number)
    return rows, tuple(lines)
