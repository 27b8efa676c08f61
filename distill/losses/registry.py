"""The one registry of every loss: name -> function, formula, paper, parameter ranges and properties.

Each loss registers itself with a decorator next to its definition:

    @register("jsd", kind="token", formula="...", paper="...",
              params={"beta": Param(0.5, "float", low=0, high=1, doc="weight of the teacher in the mixture")})
    def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_valid_tokens=None, beta=0.5):
        ...

and callers look it up by name and kind (`get_spec`, `specs`), and check a recipe's parameters against the
declared ranges before anything runs (`check_params`). Names and aliases are unique within a kind (the
f-divergence weight `reverse_kl` of DMD and the token divergence `reverse_kl` are different things).

Plain Python only (no torch, nothing else of distill), so a recipe can be checked without loading a model.
"""
from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field as dataclass_field
from types import MappingProxyType
from typing import Any, Callable

__all__ = [
    "KINDS", "LossParameterError", "LossSpec", "Param", "check_number",
    "check_params", "get_spec", "interval", "register", "register_spec", "specs",
]

# What each kind's function looks like:
# token:        fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_valid_tokens=None, **params),
#               a divergence between LM token distributions (distill.losses.logits, .family);
# classifier:   fn(student_logits [N, C], teacher_logits [N, C] | None, labels [N] | None, **params), a logit term
#               of a classifier objective, temperature among its params (.classic, .ensemble);
# feature:      fn(student_features, teacher_features, **params), a hint term (.features); see needs_class_means;
# diffusion:    a diffusion / flow distillation objective, or a piece of one (.diffusion);
# f_divergence: the weighting h(r) of DMD's gradient for one f-divergence (.f_divergence, an FDivergence);
# cross_token:  a teacher and student with different tokenizers, over aligned positions or chunks (.cross_tokenizer;
#               each function documents its inputs).
# preference:   pairs of completions (chosen, rejected) of one prompt (.preference): LossSpec.inputs says whether
#               the function takes summed sequence log-probs [B] ("sequence") or logits [B, L, V] ("distribution").
KINDS = ("token", "classifier", "feature", "diffusion", "f_divergence", "cross_token", "preference")


class LossParameterError(ValueError):
    """A loss name or parameter a caller got wrong: `field` names it (e.g. "objective.beta", None when the
    registry cannot know the caller's field), `fix` says what to do. Callers turn it into their own user error."""

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.field, self.fix = field, fix


# ---------------------------------------------------------------------------------------------
# Numbers and ranges: one check shared by Param and by the loss functions' own argument checks
# ---------------------------------------------------------------------------------------------

def _bound(value: float) -> str:
    return "inf" if value == math.inf else "-inf" if value == -math.inf else f"{value:g}"


def interval(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    """The interval as text, e.g. "[0, 1]", "(0, inf)"; a missing or infinite end is unbounded (always open)."""
    low = -math.inf if low is None else low
    high = math.inf if high is None else high
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    return f"{left}{_bound(low)}, {_bound(high)}{right}"


def check_number(name: str, value: object, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, allow_inf: bool = False,
                 fix: str | None = None) -> float | int:
    """`value` as a float (an int if `integer`) in the interval; LossParameterError naming `name` otherwise.

    Refuses bools (True is not 1.0 here), non-numbers (strings included: coercing YAML's strings is
    Param.check's job), NaN, +-inf (unless allow_inf) and values outside [low, high] (ends open on request,
    None = unbounded). The message names `name`, the allowed range and the value got, then `fix` if given.
    """
    def refuse(requirement: str) -> LossParameterError:
        return LossParameterError(f"{name} must {requirement}" + (f": {fix}" if fix else ""), field=name, fix=fix)

    kind = "an integer" if integer else "a number"
    where = interval(low, high, low_open=low_open, high_open=high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise refuse(f"be {kind} in {where}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        raise refuse(f"be in {where}, got an integer of {value.bit_length()} bits") from None
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise refuse(f"be {kind} in {where} (finite), got {number}")
    low_ok = low is None or (number > low if low_open else number >= low)
    high_ok = high is None or (number < high if high_open else number <= high)
    if not (low_ok and high_ok):
        raise refuse(f"be in {where}, got {number:g}")
    if integer:
        if not number.is_integer():
            raise refuse(f"be {kind} in {where}, got {value!r}")
        return int(number)
    return number


@dataclass(frozen=True)
class Param:
    """One parameter of a loss: default, type, allowed values, meaning.

    kind: "float" | "int" | "bool" | "str". low / high: bounds of a number (None = unbounded), each end closed
    unless low_open / high_open. choices: the allowed strings of a "str" parameter (empty = any string).
    allow_inf: accept +-inf for a float (NaN never); no loss needs it today. A default of None makes the
    parameter optional: None is accepted and means "the function picks the value" (e.g. consistency's c).
    """

    default: Any
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    doc: str = ""
    allow_inf: bool = False

    def __post_init__(self):
        if self.kind not in ("float", "int", "bool", "str"):
            raise ValueError(f"Param kind must be float, int, bool or str, got {self.kind!r}")
        if not self.doc:
            raise ValueError("Param needs a one-line doc: what the parameter means")
        object.__setattr__(self, "choices", tuple(self.choices))
        self.check(self.default, field="default")  # a default outside its own range is a bug at definition

    @property
    def range(self) -> str:
        """The allowed values as text: "[0, 1]", "(0, inf)", "true | false", "l2 | pseudo_huber"."""
        if self.kind == "bool":
            return "true | false"
        if self.kind == "str":
            return " | ".join(self.choices) if self.choices else "any string"
        return interval(self.low, self.high, low_open=self.low_open, high_open=self.high_open)

    def describe(self, name: str) -> str:
        """One line for listings and error messages, e.g. "beta=0.5 in [0, 1]", "iterations=20, an integer in
        [1, inf)", "kind='l2', one of l2 | pseudo_huber"."""
        if self.kind == "bool":
            text = f"{name}={self.default!r} (true | false)"
        elif self.kind == "str":
            text = f"{name}={self.default!r}, one of {self.range}"
        elif self.kind == "int":
            text = f"{name}={self.default!r}, an integer in {self.range}"
        else:
            text = f"{name}={self.default!r} in {self.range}"
        return text + (" or None" if self.default is None else "")

    def check(self, value: object, *, field: str) -> Any:
        """`value` checked and coerced to this parameter's type; LossParameterError naming `field` otherwise.

        Numeric strings are accepted for numbers (PyYAML reads `1e-3`, without a dot, as a string) and
        integral floats for ints (2.0 -> 2); bools are refused for numbers, and NaN and +-inf always
        (unless allow_inf) as well as values outside the range.
        """
        fix = f"use {self.describe(field.rsplit('.', 1)[-1])}: {self.doc}"
        if value is None and self.default is None:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise LossParameterError(f"{field} must be true or false, got {value!r}", field=field, fix=fix)
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise LossParameterError(f"{field} must be one of {self.range}, got {value!r}", field=field, fix=fix)
            return value
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise LossParameterError(f"{field} must be a number in {self.range}, got {value!r}", field=field,
                                         fix=fix) from None
        try:
            return check_number(field, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open,
                                integer=self.kind == "int", allow_inf=self.allow_inf)
        except LossParameterError as error:  # the same message, with this parameter's fix attached
            raise LossParameterError(str(error), field=field, fix=fix) from None


# ---------------------------------------------------------------------------------------------
# Specs and the registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    """Everything about one registered loss (see KINDS for the signature of each kind)."""

    name: str  # the canonical name, as recipes write it
    fn: Callable[..., Any]  # the function (or a callable object, e.g. an f-divergence's weight)
    kind: str  # one of KINDS
    formula: str  # the math, in plain text, for `distill losses`
    paper: str  # where it comes from
    params: Mapping[str, Param] = dataclass_field(default_factory=dict)  # its own keyword parameters, with ranges
    aliases: tuple[str, ...] = ()  # other names for it (within its kind)
    # False when the value is not a sum of independent per-token terms (sinkhorn couples the tokens of a
    # call): a chunked / fused computation must refuse it.
    token_separable: bool = True
    # A schedule that may set one of the params each step instead of the recipe: "taid" (TaidSchedule sets t).
    schedule: str | None = None
    # The call needs the ground-truth labels (classifier terms such as dkd, the feature term nd).
    needs_labels: bool = False
    # The call needs a teacher signal; False for the hard-label `ce` term.
    needs_teacher: bool = True
    # Feature terms: takes the teacher's class-mean features (and optionally its mean feature norm) instead of
    # the teacher's features of the batch: fn(student_features, teacher_class_means, labels, teacher_norm=None).
    needs_class_means: bool = False
    # Feature terms compared point-wise: the student's features must have the teacher's shape (nd: the class
    # means' width), so a student of another width needs a projector first.
    equal_shapes: bool = False
    # Relational terms compare the examples of a batch with each other: the batch needs at least this many.
    min_examples: int = 1
    # False for registered pieces that are not objectives themselves (a weight, a regression target).
    is_objective: bool = True
    # Preference losses: "sequence" (summed log-probs per completion) or "distribution" (logits per position).
    inputs: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"loss {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"loss name must be an identifier-like string, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"loss {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not (self.formula and self.paper):
            raise ValueError(f"loss {self.name!r} needs a formula and a paper")
        params = dict(self.params or {})
        for key, param in params.items():
            if not isinstance(param, Param):
                raise ValueError(f"loss {self.name!r}: parameter {key!r} must be a Param, got {type(param).__name__}")
        object.__setattr__(self, "params", MappingProxyType(params))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if self.name in self.aliases:
            raise ValueError(f"loss {self.name!r} lists its own name among its aliases")
        if isinstance(self.min_examples, bool) or not isinstance(self.min_examples, int) or self.min_examples < 1:
            raise ValueError(f"loss {self.name!r}: min_examples must be an integer >= 1, got {self.min_examples!r}")

    def defaults(self) -> dict[str, Any]:
        """The parameters with their default values, e.g. {"beta": 0.5} for jsd."""
        return {key: param.default for key, param in self.params.items()}

    def describe_params(self) -> str:
        """The parameters in one line, e.g. "epsilon=0.1 in (0, inf), iterations=20, an integer in [1, inf)"."""
        return ", ".join(param.describe(key) for key, param in self.params.items()) or "none"


_SPECS: list[LossSpec] = []  # registration order, every kind
_NAMES: dict[str, dict[str, LossSpec]] = {kind: {} for kind in KINDS}  # kind -> name or alias -> spec


def register_spec(name: str, *, kind: str, fn: Callable[..., Any], formula: str, paper: str,
                  params: Mapping[str, Param] | None = None, aliases: tuple[str, ...] = (), **properties) -> LossSpec:
    """Build the LossSpec and add it; ValueError if its name or an alias is already taken within its kind.

    The function form of `register`, for what is not a plain function defined with a decorator (the
    f-divergence weights are small objects). `properties` are LossSpec's other fields (token_separable, ...).
    """
    spec = LossSpec(name=name, fn=fn, kind=kind, formula=formula, paper=paper, params=params or {},
                    aliases=tuple(aliases), **properties)
    taken = _NAMES[kind]
    for key in (name, *spec.aliases):
        if key in taken:
            raise ValueError(f"{kind} loss name {key!r} is already registered (by {taken[key].name!r})")
    if len(set(spec.aliases)) != len(spec.aliases):
        raise ValueError(f"loss {name!r} lists an alias twice: {spec.aliases}")
    _SPECS.append(spec)
    taken.update({key: spec for key in (name, *spec.aliases)})
    return spec


def register(name: str, *, kind: str, formula: str, paper: str, params: Mapping[str, Param] | None = None,
             aliases: tuple[str, ...] = (), **properties) -> Callable[[Callable], Callable]:
    """Decorator: register the function below under `name` (see register_spec); returns it unchanged."""

    def decorate(fn: Callable) -> Callable:
        register_spec(name, kind=kind, fn=fn, formula=formula, paper=paper, params=params, aliases=aliases,
                      **properties)
        return fn

    return decorate


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (or None for every kind), got {kind!r}")


def specs(kind: str | None = None) -> list[LossSpec]:
    """The registered specs of `kind` (every kind when None), in registration order."""
    _check_kind(kind)
    return [spec for spec in _SPECS if kind is None or spec.kind == kind]


def get_spec(name: str, kind: str | None = None) -> LossSpec:
    """The spec registered as `name` or one of its aliases, within `kind` (any kind when None).

    LossParameterError (a ValueError, field None) when the name is unknown (with the known names of the kind
    and the closest one), or, without a kind, when it names losses of several kinds (pass kind=).
    """
    _check_kind(kind)
    kinds = KINDS if kind is None else (kind,)
    found = [_NAMES[k][name] for k in kinds if isinstance(name, str) and name in _NAMES[k]]
    if len(found) == 1:
        return found[0]
    if found:
        kinds_found = ", ".join(spec.kind for spec in found)
        raise LossParameterError(f"{name!r} names losses of several kinds ({kinds_found}): say which",
                                 fix=f"pass kind= one of {kinds_found}")
    known = [spec.name for spec in specs(kind)]
    aliases = [f"{alias} -> {spec.name}" for spec in specs(kind) for alias in spec.aliases]
    close = difflib.get_close_matches(str(name), [key for k in kinds for key in _NAMES[k]], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    among = f" among the {kind} losses" if kind else ""
    alias_text = f" (aliases: {', '.join(aliases)})" if aliases else ""
    raise LossParameterError(f"unknown loss {name!r}{among}; {hint}known: {', '.join(known)}{alias_text}",
                             fix=f"use one of {', '.join(known)}")


def check_params(name: str, params: Mapping[str, Any], *, kind: str | None = None,
                 field_prefix: str = "objective") -> dict[str, Any]:
    """The loss's parameters: defaults filled in, each given value checked and coerced by its Param.

    LossParameterError with field f"{field_prefix}.{key}" for an unknown key (naming the loss's parameters)
    or a bad value (naming the allowed range and the value got).
    """
    spec = get_spec(name, kind)
    checked = spec.defaults()
    for key, value in params.items():
        field_name = f"{field_prefix}.{key}" if field_prefix else str(key)
        if key not in spec.params:
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)  # e.g. a key "\n"
            close = difflib.get_close_matches(str(key), list(spec.params), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise LossParameterError(
                f"`{shown}` is not a parameter of loss `{spec.name}`; {hint}its parameters: {spec.describe_params()}",
                field=field_name, fix=f"remove `{shown}`" + (f" or use one of {', '.join(spec.params)}" if spec.params
                                                             else f": `{spec.name}` takes no parameters"))
        checked[key] = spec.params[key].check(value, field=field_name)
    return checked
