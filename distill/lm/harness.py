"""`distill eval TARGET --lm-eval TASKS`: saved causal LMs scored on lm-evaluation-harness tasks.

    TARGET   a finished LM run: rows teacher (the recipe's teacher.path), alone, distilled; or one saved
             causal LM: one row, `model`.
    TASKS    lm-eval task, group or tag names (hub tasks need the hub, or its datasets in the local cache),
             or tasks of your own: YAML files in the directories given as `include_path`.

Task names are checked against lm-eval's index before any model loads. Each model is loaded as distill
loads it (local directory, hub id or `builtin:`), wrapped in lm-eval's HF wrapper (HFLM) and scored by
`lm_eval.simple_evaluate`. A row holds one column per task metric, `<task>/<metric>` (`<task>/<metric>:<filter>`
for a filter other than `none`); stderr entries are left out. Subtasks of a group are kept in the rows
(and --output) but hidden from the printed table, which shows the group's aggregate.
"""
from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import time
from pathlib import Path

import yaml

from distill.core.errors import DistillError
from distill.core.io import atomic_write_json
from distill.core.rundir import RECIPE_FILE, RunResult

# Files that mean a model directory carries its own tokenizer (else the teacher's is used).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
INSTALL_FIX = 'pip install "distill[eval]" (or pip install lm-eval)'


def import_lm_eval():
    """The lm_eval package, or a DistillError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (a broken install fails here, not mid-run)
    except ImportError as error:
        raise DistillError(f"lm-evaluation-harness is not installed ({error})", field="--lm-eval",
                           fix=INSTALL_FIX) from None
    return lm_eval


def parse_tasks(text: str | list[str]) -> list[str]:
    """`"a,b"` (or a list) -> ["a", "b"], in order, each once."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    tasks = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not tasks:
        raise DistillError("no lm-eval task given", field="--lm-eval",
                           fix="name one or more tasks, comma-separated: --lm-eval hellaswag,arc_easy")
    return tasks


def task_manager(tasks: list[str], include_path: str | Path | list | None = None):
    """lm-eval's TaskManager for `tasks`, every name checked (unknown ones raise a DistillError naming
    `--lm-eval`, with the close matches). Indexing lm-eval's ~15k shipped tasks takes seconds: when every
    task is a plain task of the include directories, only those are indexed."""
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    includes = include_paths(include_path)
    for directory in includes:
        if not Path(directory).is_dir():
            raise DistillError(f"`{directory}` is not a directory", field="--lm-eval-include",
                               fix="give the directory holding your task YAML files")
    with lm_eval_log_level(logging.ERROR):
        if includes:
            local = TaskManager(include_path=includes, include_defaults=False)
            if all(_is_plain_task(local, name) for name in tasks):
                return local
        manager = TaskManager(include_path=includes or None)
    unknown = [name for name in tasks if name not in manager.task_index and not _is_task_file(name)]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hints.append(f"`{name}`" + (f" (close: {', '.join(close)})" if close else ""))
        where = f" nor of {', '.join(f'`{p}`' for p in includes)}" if includes else ""
        raise DistillError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {'; '.join(hints)}: not a task "
                           f"of lm-eval {lm_eval.__version__} ({len(manager.all_tasks):,} names){where}",
                           field="--lm-eval",
                           fix="use a name `lm-eval ls tasks` lists, or put a YAML task of your own in a directory "
                               "and pass it with --lm-eval-include DIR")
    return manager


def include_paths(include_path: str | Path | list | None) -> list[str]:
    """lm-eval's include_path (one directory, a list, or None) as a list of strings."""
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    return [str(p) for p in paths if p is not None]


def _is_plain_task(manager, name: str) -> bool:
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    return entry is not None and entry.kind in (Kind.TASK, Kind.PY_TASK)


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()  # lm-eval also takes a YAML path as a task


@contextlib.contextmanager
def lm_eval_log_level(level: int):
    """lm-eval's loggers (all under `lm_eval`) at `level` for the duration."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval's INFO/WARNING logging and progress bars off for the duration (restored after): our table is
    the output. Its per-call environment report (torch's collect_env, ~2 s of subprocesses per model) and
    git hash (a `fatal: not a git repository` outside one) are skipped too: nothing here reports them."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from tqdm import tqdm

    def silent_tqdm(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    # Module globals lm-eval 0.4.13 reads at call time; a name a later version drops is simply not patched.
    patches = [(module, "tqdm", silent_tqdm)
               for module in (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)]
    patches += [(lm_eval.evaluator, "add_env_info", lambda results: None),
                (lm_eval.evaluator, "get_git_commit_hash", lambda: None)]
    patches = [(module, name, new, getattr(module, name)) for module, name, new in patches if hasattr(module, name)]
    datasets_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for module, name, new, _ in patches:
        setattr(module, name, new)
    try:
        with lm_eval_log_level(logging.ERROR):
            yield
    finally:
        for module, name, _, old in patches:
            setattr(module, name, old)
        if datasets_bars:
            datasets.enable_progress_bars()


# ---- the rows ------------------------------------------------------------------------------------------

def harness_rows(models: dict[str, str | Path], tasks: list[str], *, include_path=None, limit: float | None = None,
                 batch_size: int = 8, device: str | None = None, dtype: str = "float32",
                 tokenizer: str | None = None, trust_remote_code: bool = False) -> RunResult:
    """Each model (row -> local directory, hub id or `builtin:` name) scored on lm-eval `tasks`.

    `tokenizer` serves models saved without one of their own; `limit` caps the documents per task (a count,
    or a fraction below 1); `device` defaults to cuda when there is one. The primary metric is the first
    task's first metric, better as lm-eval's `higher_is_better` says."""
    import torch

    from distill.lm import models as lm_models

    started = time.perf_counter()
    manager = task_manager(tasks, include_path)  # every name checked before any model loads
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    with quiet_lm_eval():
        loaded = load_tasks(manager, tasks)

    lm_models.quiet_transformers()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: dict[str, dict] = {}
    directions: dict[str, str] = {}
    hidden: list[str] = []
    summary: dict = {}
    for row, path in models.items():
        path = str(path)
        field = "teacher.path" if row == "teacher" else "TARGET"
        model = lm_models.load_causal_lm(path, field, lm_models.DTYPES[dtype], trust_remote_code).eval().to(device)
        own = tokenizer is None or _has_tokenizer(path)
        tok = lm_models.load_tokenizer(path if own else tokenizer, field, trust_remote_code)
        with quiet_lm_eval():
            wrapped = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
            results = lm_eval.simple_evaluate(model=wrapped, tasks=list(loaded), task_manager=manager, limit=limit,
                                              log_samples=False, bootstrap_iters=0)
        rows[row], row_directions, row_hidden = metric_columns(results)
        directions.update(row_directions)
        hidden += [c for c in row_hidden if c not in hidden]
        summary = {"n-shot": results.get("n-shot", {}), "documents": {
            task: counts.get("effective") for task, counts in results.get("n-samples", {}).items()}}
        del wrapped, model
        gc.collect()
    primary = _primary(rows, tasks, hidden)
    meta = {"task": "lm", "primary_metric": primary, "higher_is_better": directions.get(primary, "higher") == "higher",
            "directions": directions, "hidden_columns": hidden, "world_size": 1,
            "seconds": time.perf_counter() - started,
            "lm_eval": {"version": lm_eval.__version__, "tasks": list(tasks), "limit": limit,
                        "include_path": include_paths(include_path), **summary},
            "notes": [_note(tasks, limit, summary)]}
    return RunResult(None, rows, meta)


def load_tasks(manager, tasks: list[str]) -> list:
    """The requested tasks and groups as lm-eval objects (top-level ones: a group brings its subtasks),
    built once for every model: their datasets are fetched once, and before any model loads."""
    try:
        loaded = manager.load(list(tasks))
    except Exception as error:  # noqa: BLE001  (a task's own loading code may raise anything: name the task list)
        first_line = (str(error).splitlines() or [""])[0]
        data = isinstance(error, OSError)  # ConnectionError, FileNotFoundError, datasets' DatasetNotFoundError
        raise DistillError(f"could not load the lm-eval tasks {', '.join(tasks)}: {type(error).__name__}: "
                           f"{first_line}", field="--lm-eval",
                           fix="a hub task needs the hub, or its dataset in the local Hugging Face cache (run once "
                               "where the hub is reachable); a local task needs its dataset_path / data_files"
                           if data else "check the task list and the tasks' YAML files") from None
    children = {child for members in loaded["group_map"].values() for child in members}
    top = [group for name, group in loaded["groups"].items() if name not in children]
    return top + [task for name, task in loaded["tasks"].items() if name not in children]


def metric_columns(results: dict) -> tuple[dict, dict, list]:
    """(row, directions, hidden) from simple_evaluate's results: `<task>/<metric>` -> value for every
    numeric metric but stderrs; "higher"/"lower" per column; the columns of subtasks of a group."""
    row, directions = {}, {}
    # A group with metrics of its own (an aggregate) stands for its subtasks in the printed table.
    subtasks = {name for group, members in results.get("group_subtasks", {}).items()
                if _has_metrics(results["results"].get(group, {})) for name in members}
    hidden = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, stderrs
            column = f"{task}/{metric}" + ("" if filter_name == "none" else f":{filter_name}")
            row[column] = float(value)
            if metric in better and better[metric] is not None:
                directions[column] = "higher" if better[metric] else "lower"
            if task in subtasks:
                hidden.append(column)
    return row, directions, hidden


def _has_metrics(metrics: dict) -> bool:
    return any("," in key and "_stderr" not in key and isinstance(value, (int, float)) for key, value in metrics.items())


def _primary(rows: dict[str, dict], tasks: list[str], hidden: list[str]) -> str | None:
    """The first requested task's first metric (else the first shown column)."""
    columns = [c for c in dict.fromkeys(c for row in rows.values() for c in row) if c not in hidden]
    first = next((c for c in columns if c.startswith(f"{tasks[0]}/")), None)
    return first or (columns[0] if columns else None)


def _note(tasks: list[str], limit, summary: dict) -> str:
    documents = ", ".join(f"{task} {count}" for task, count in summary.get("documents", {}).items())
    shots = sorted(set(summary.get("n-shot", {}).values()))
    text = f"lm-eval tasks: {', '.join(tasks)} (documents: {documents}; shots: {', '.join(map(str, shots))})"
    return text + (f"; --lm-eval-limit {limit}: a subset, not the task's full score" if limit is not None else "")


def _has_tokenizer(path: str) -> bool:
    from distill.lm.models import resolve_model_path

    local = Path(resolve_model_path(path, "MODEL"))
    return not local.is_dir() or any((local / name).is_file() for name in TOKENIZER_FILES)


# ---- distill eval TARGET --lm-eval ---------------------------------------------------------------------

def models_of(target: Path) -> tuple[dict[str, str], dict]:
    """(row -> model, options) of `target`: a finished LM run (teacher, alone, distilled; options: the
    teacher's tokenizer for models saved without one, trust_remote_code, name) or one saved causal LM."""
    from distill.lm import FAMILY
    from distill.lm.models import resolve_model_path

    if not target.is_dir():
        raise DistillError(f"`{target}` is not a directory", field="TARGET",
                           fix="give a run directory or a saved model directory")
    if (target / RECIPE_FILE).is_file():
        saved = yaml.safe_load((target / RECIPE_FILE).read_text()) or {}
        if saved.get("task", "lm") != "lm":
            raise DistillError(f"`{target}` is a {saved['task']} run; lm-eval scores causal LMs", field="--lm-eval",
                               fix="drop --lm-eval to score it on its recipe's data")
        teacher = (saved.get("teacher") or {}).get("path")
        if not teacher:
            raise DistillError(f"`{target / RECIPE_FILE}` names no teacher.path", field="TARGET",
                               fix="give one of the run's model directories (e.g. TARGET/student) instead")
        resolve_model_path(teacher, f"teacher.path (in {target / RECIPE_FILE})")
        from distill.lm.run import saved_models

        saved_rows = saved_models(target)
        if not saved_rows:
            raise DistillError(f"`{target}` holds no saved model yet (the run has not finished a phase)",
                               field="TARGET", fix="finish it with `distill run RECIPE --resume`")
        models = {"teacher": teacher, **{row: str(path) for row, path in saved_rows.items()}}
        options = {"tokenizer": teacher, "name": saved.get("name"),
                   "trust_remote_code": bool(saved["teacher"].get("trust_remote_code", False))}
        return models, options
    if not FAMILY.recognizes(target):
        raise DistillError(f"`{target}` is neither an LM run directory (recipe.yaml) nor a saved causal LM "
                           "(config.json naming a *ForCausalLM)", field="TARGET",
                           fix="give a run's output directory or one of its model directories (student/)")
    parent = target.parent / RECIPE_FILE
    teacher = ((yaml.safe_load(parent.read_text()) or {}).get("teacher") or {}).get("path") \
        if parent.is_file() else None
    return {"model": str(target)}, {"tokenizer": teacher, "name": target.name}


def evaluate_harness(target: str | Path, tasks: str | list[str], *, include_path=None, limit: float | None = None,
                     batch_size: int = 8, device: str | None = None, output: str | Path | None = None) -> RunResult:
    """`distill eval TARGET --lm-eval TASKS` (see the module docstring); with `output`, the result is also
    written there as JSON ({rows, meta})."""
    target = Path(target)
    tasks = parse_tasks(tasks)
    models, options = models_of(target)
    if limit is not None and limit <= 0:
        raise DistillError(f"--lm-eval-limit must be positive, got {limit}", field="--lm-eval-limit",
                           fix="a number of documents per task (e.g. 100), or a fraction below 1 (e.g. 0.1)")
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of the task
    result = harness_rows(models, tasks, include_path=include_path, limit=limit, batch_size=batch_size,
                          device=device, tokenizer=options.get("tokenizer"),
                          trust_remote_code=options.get("trust_remote_code", False))
    result.run_dir = target
    result.meta.update({"evaluated": str(target), "name": options.get("name") or target.name})
    if output is not None:
        atomic_write_json(output, result.to_json())
    return result
