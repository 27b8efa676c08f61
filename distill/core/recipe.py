"""What every recipe shares: strict pydantic sections, a name and a run directory, `--set a.b=c`
overrides, loading from YAML / `builtin:` / dict / model, and readable errors.

`load_recipe(source, overrides)` reads the YAML, applies the overrides, looks up the family of its
`task:` (core.families) and validates with that family's recipe class; every problem becomes a
`DistillError` naming the field path and a fix, before any model loads.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.core.errors import DistillError, FieldValueError
from distill.core.families import DEFAULT_TASK, family_names, get_family

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the recipes shipped inside the package

# A seed: numpy's generators refuse negative seeds and torch's refuse ones past 64 bits, so both ends are
# checked with the recipe rather than when the first generator is made.
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class StrictModel(BaseModel):
    """A recipe section: unknown keys are refused, assignments are validated, and no float field takes NaN or
    +-inf (no field gives them a meaning; `.inf` in YAML is a typo's likelier outcome than a wish)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PrivacySpec(StrictModel):
    """train.privacy: DP-SGD on the student (core.privacy, opacus). Give `epsilon` (the noise is then chosen to
    spend at most that over the run) or `noise_multiplier` (epsilon is then what the accountant reports)."""

    epsilon: float | None = Field(None, gt=0, description="The privacy budget of the whole run.")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of (epsilon, delta)-DP; keep it below 1 / rows.")
    max_grad_norm: float = Field(1.0, gt=0, description="Each row's gradient is clipped to this L2 norm.")
    noise_multiplier: float | None = Field(None, ge=0, description="Instead of epsilon: the noise's standard "
                                                                   "deviation as a multiple of max_grad_norm.")

    @model_validator(mode="after")
    def _one_budget(self) -> "PrivacySpec":
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of `epsilon` (a budget) or `noise_multiplier` (a noise level)")
        return self


class LogSpec(StrictModel):
    """Experiment trackers (core.trackers): every loss record (`train.log_every`) and every eval, as
    `<phase>/<key>` and `<phase>/eval/<metric>` scalars, and the resolved recipe as the run's config;
    from the main process only, through accelerate's tracker classes. losses.jsonl and metrics.jsonl
    are written either way."""

    trackers: list[Literal["tensorboard", "trackio", "wandb"]] = Field(
        default_factory=list,
        description="Trackers to send the logs to (none by default). tensorboard writes event files under `dir`; "
                    "trackio logs to its local database (`trackio show`); wandb runs offline (WANDB_MODE=offline, "
                    "files under `dir`, upload later with `wandb sync`) unless WANDB_MODE or WANDB_API_KEY is set. "
                    "A tracker whose package is missing is refused before anything loads.")
    project: str | None = Field(None, min_length=1, description="wandb / trackio project; default: the recipe's "
                                                                "`name`.")
    dir: str | None = Field(None, min_length=1, description="Directory of the trackers' local files (tensorboard "
                                                            "event files, wandb offline runs); default "
                                                            "<run dir>/trackers.")

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, trackers: list[str]) -> list[str]:
        repeated = sorted({t for t in trackers if trackers.count(t) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return trackers


class RunRecipe(StrictModel):
    """What every family's recipe has: a task, a name, a run directory and its trackers."""

    task: str = DEFAULT_TASK
    name: str = "run"
    output: str | None = Field(None, description="Run directory; default runs/<name>.")
    log: LogSpec = Field(default_factory=LogSpec, description="Experiment trackers (tensorboard, trackio, wandb).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # runs/<name> is the default run directory: a name must not leave runs/ nor be empty
        parts = Path(name).parts
        if not name.strip() or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"name {name!r} must be a non-empty relative name without `..` (the default run "
                             "directory is runs/<name>); set `output` for a directory elsewhere")
        return name

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    def to_yaml(self) -> str:
        """The resolved recipe (every default filled in), as written to a run's recipe.yaml."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- overrides -----------------------------------------------------------------------------------

def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the nested dict `data` in place."""
    if "=" not in assignment:
        raise DistillError(f"`{assignment}` is not of the form key.path=value", field="--set",
                           fix="write e.g. --set train.steps=50")
    key_path, raw_value = assignment.split("=", 1)
    keys = [k for k in key_path.strip().split(".") if k]
    if not keys:
        raise DistillError(f"`{assignment}` names no field", field="--set", fix="write e.g. --set train.steps=50")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):  # not YAML (or past the parser's depth, a date such as
        value = raw_value                                 # 2024-13-01, an int past 4300 digits): the text itself
    node = data
    for depth, key in enumerate(keys):
        if isinstance(node, list):  # a list item by its index: objective.terms.0.temperature=2
            if not (key.isdigit() and int(key) < len(node)):
                raise DistillError(f"`{'.'.join(keys[:depth])}` is a list of {len(node)}; `{key}` is not an index "
                                   "in it", field="--set", fix=f"use an index from 0 to {len(node) - 1}")
            key = int(key)
            child = node[key]
        else:
            child = node.get(key)
        if depth == len(keys) - 1:
            node[key] = value
            return
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise DistillError(f"`{'.'.join(keys[:depth + 1])}` is a value, not a section", field="--set",
                               fix=f"set `{'.'.join(keys[:depth + 1])}=...` directly")
        node = child


# ---- readable validation errors --------------------------------------------------------------------

def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` of `model` ('did you mean' on unknown keys; a sweep's seed fields)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if annotation is None:
            return []
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def readable_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> DistillError:
    """One DistillError listing every problem of a pydantic ValidationError as `field.path: message`."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, FieldValueError):
            loc += tuple(cause.field.split("."))
        field = prefix + (".".join(_key_text(p) for p in loc) or "recipe")
        kind, message = item["type"], item["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key" + (f"; did you mean `{close[0]}`?" if close else "")
            message += f" (allowed here: {', '.join(allowed)})" if allowed else ""
        elif kind == "missing":
            message = "required field is missing"
        elif "input" in item and kind not in ("value_error", "assertion_error"):
            message += f" (got {shown(item['input'])})"
        lines.append(f"{field}: {message}")
    fix = "edit the recipe or override with --set FIELD=VALUE; `distill run --help` lists the options"
    return DistillError("invalid recipe\n  " + "\n  ".join(lines), fix=fix)


def _key_text(key: Any) -> str:
    """A key in a field path: as written when plain, else quoted (`''`, `' a'`, `'a.b'`, a number key as 3)."""
    if isinstance(key, str) and key and key.isprintable() and not any(c in key for c in ".: "):
        return key
    return shown(key)


def shown(value: Any, limit: int = 80) -> str:
    """repr(value) for a message, cut to about `limit` characters (a 400-digit number or a pasted file is not
    worth repeating); never fails (Python refuses to print an int of over 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        name = type(value).__name__
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name} too large to print"
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-10:]} ({len(text)} characters)"


def validate_section(model: type[BaseModel], data: Any, prefix: str = ""):
    """`model.model_validate(data)` with a readable DistillError (fields prefixed by `prefix`)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise readable_error(error, model, prefix) from None


# ---- loading -----------------------------------------------------------------------------------------

def parse_recipe(data: Any, overrides: list[str] | tuple[str, ...] = ()) -> RunRecipe:
    """Validate a recipe given as a dict (after applying `overrides`) with its family's recipe class."""
    if not isinstance(data, dict):
        raise DistillError(f"a recipe is a mapping of sections, got {type(data).__name__}",
                           fix="start from recipes/oracle-demo.yaml")
    _refuse_unwritable(data)
    data = copy.deepcopy(data)  # overrides must not change the caller's dict
    for assignment in overrides:
        apply_override(data, assignment)
    if overrides:
        _refuse_unwritable(data)
    task = data.get("task", DEFAULT_TASK)
    if task not in family_names():
        named = task if isinstance(task, str) and len(task) <= 80 else shown(task)
        close = difflib.get_close_matches(named, family_names(), n=1)
        raise DistillError(f"unknown task `{named}`" + (f"; did you mean `{close[0]}`?" if close else ""),
                           field="task", fix=f"use one of: {', '.join(family_names())}")
    return validate_section(get_family(task).recipe_class(), data)


_MAX_DEPTH = 100  # no recipe nests this deep; copying and validating recurse, and Python stops a few hundred down
_DEPTH_FIX = "a recipe is a few levels of `section: {key: value}`; recipes/oracle-jsd.yaml is a short example"


def _refuse_unwritable(data: Any) -> None:
    """A DistillError naming the place of what no field takes and the resolved recipe.yaml could not hold: nesting
    more than _MAX_DEPTH deep, a container inside itself (a YAML alias inside its own anchor, `a: &x [*x]`), or
    text that is not Unicode (a lone surrogate: a non-UTF-8 byte in a --set argument, or a `"\\ud800"` escape).
    Iterative, and a container shared by aliases is walked once."""
    done, open_ = set(), set()  # containers walked / being walked (on the current path)
    stack = [(data, (), False)]
    while stack:
        node, path, leaving = stack.pop()
        if leaving:
            open_.discard(id(node))
            done.add(id(node))
            continue
        if isinstance(node, (dict, list)) and id(node) in done:
            continue
        deep = isinstance(node, (dict, list)) and len(path) > _MAX_DEPTH
        problem = None
        if isinstance(node, str) and not encodable(node):
            problem = f"{shown(node)} is not valid text (a lone surrogate)"
        elif isinstance(node, dict) and not all(encodable(key) for key in node if isinstance(key, str)):
            problem = "a key here is not valid text (a lone surrogate)"
        elif isinstance(node, (dict, list)) and id(node) in open_:
            problem = "holds itself (a YAML alias inside its own anchor)"
        elif deep:
            problem = f"nests more than {_MAX_DEPTH} levels deep"
        if problem is not None:
            field = ".".join(map(_key_text, path[:3] if deep else path)) + ("..." if deep else "")
            fix = "write it as UTF-8 text" if "surrogate" in problem else _DEPTH_FIX
            raise DistillError(problem, field=field or "recipe", fix=fix)
        if not isinstance(node, (dict, list)):
            continue
        open_.add(id(node))
        stack.append((node, path, True))
        stack.extend((child, (*path, key), False)
                     for key, child in (node.items() if isinstance(node, dict) else enumerate(node)))


def encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8: no lone surrogates (what Python makes of a non-UTF-8 byte in a
    command-line argument, and JSON and YAML of a `"\\ud800"` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_recipe(source: str | Path | dict | BaseModel, overrides: list[str] | tuple[str, ...] = ()) -> RunRecipe:
    """Recipe from a YAML path, `builtin:<name>`, a dict or a recipe object, with `--set` overrides."""
    if isinstance(source, BaseModel):
        return parse_recipe(source.model_dump(mode="json", exclude_unset=True), overrides)
    if isinstance(source, dict):
        return parse_recipe(dict(source), overrides)
    path = builtin_recipe_path(str(source)) if str(source).startswith("builtin:") else Path(source)
    if not path.is_file():
        raise DistillError(f"recipe file `{path}` not found", fix="give the path of a YAML recipe, "
                           "e.g. recipes/oracle-jsd.yaml")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DistillError(f"`{path}` is not UTF-8 text (byte {raw[error.start]:#04x} at line {line}, "
                           f"offset {error.start})", fix="save the recipe as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise DistillError(f"`{path}` nests more levels than the YAML reader can follow", fix=_DEPTH_FIX) from None
    except ValueError as error:  # PyYAML builds dates and ints itself: 2024-13-01, an int past 4300 digits
        raise DistillError(f"`{path}` has a value YAML cannot read: {str(error).split(';')[0]}",
                           fix="quote the value if it is text (e.g. name: \"2024-13-01\")") from None
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if context is not None and getattr(error, "context", None) and (mark is None or context.line != mark.line):
            where += f" ({error.context} from line {context.line + 1}, column {context.column + 1})"
        raise DistillError(f"`{path}` is not valid YAML{where}: {getattr(error, 'problem', error)}",
                           fix="check indentation and `key: value` pairs there") from None
    if data is None and not overrides:
        required = [name for name, field in get_family(DEFAULT_TASK).recipe_class().model_fields.items()
                    if field.is_required()]
        raise DistillError(f"recipe file `{path}` is empty", fix=f"write a recipe there: an {DEFAULT_TASK} recipe "
                           f"needs the sections {', '.join(required)}; recipes/oracle-jsd.yaml is a short example")
    if data is not None and not isinstance(data, dict):
        raise DistillError(f"`{path}` holds a {type(data).__name__}, not a recipe (a mapping of sections such as "
                           "teacher:, student:, data:)", fix="start from recipes/oracle-jsd.yaml")
    return parse_recipe(data if data is not None else {}, overrides)


def builtin_recipe_path(name: str) -> Path:
    """`builtin:oracle-demo` -> the recipe shipped inside the package."""
    stem = name.removeprefix("builtin:")
    path = RECIPES_DIR / f"{stem}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise DistillError(f"no built-in recipe `{stem}`", fix=f"use one of: {', '.join(known)}")
    return path
