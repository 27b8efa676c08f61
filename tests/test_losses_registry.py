"""Tests for distill.losses.registry: every loss registered and documented, declared parameters equal to the
functions' signatures, Param / check_params refusing what the functions refuse, per-loss properties, and no
parallel table beside the registry. Import hygiene of the loss modules: test_losses_imports.py."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import distill.losses as losses
from distill.losses import (
    KINDS, LossParameterError, LossSpec, Param, check_params, get_spec, register, register_spec, specs,
)
from distill.losses.registry import check_number, interval

torch.set_num_threads(1)

ALL_SPECS = specs()
TOKEN_COMMON = {"student_logits", "teacher_logits", "mask", "temperature", "num_valid_tokens"}


def _ids(spec_list):
    return [f"{spec.kind}:{spec.name}" for spec in spec_list]


# ---------------------------------------------------------------------------------------------
# 1. Every spec is complete: formula, paper, docstring, defaults within their own ranges
# ---------------------------------------------------------------------------------------------

def test_every_kind_is_registered_with_the_expected_names():
    names = {kind: [spec.name for spec in specs(kind)] for kind in KINDS}
    assert names["token"] == ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl",
                              "ab_divergence", "adaptive_kl", "taid", "sinkhorn"]
    assert names["classifier"] == ["kd", "dkd", "nkd", "pld", "ofa", "ce", "bdkd"]
    assert names["feature"] == ["fitnets", "cosine", "attention", "rkd_distance", "rkd_angle", "cka", "nd"]
    assert set(names["diffusion"]) == {"edm_denoising", "flow_matching", "dmd_generator", "consistency",
                                       "f_divergence_weight", "progressive_distillation_target"}
    assert names["f_divergence"] == ["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys",
                                     "softened_reverse_kl", "neyman_chi2"]
    assert specs() == [spec for spec in ALL_SPECS]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_spec_is_documented_and_its_defaults_pass_their_own_check(spec):
    assert spec.kind in KINDS and spec.formula.strip() and spec.paper.strip()
    documented = spec.fn if inspect.isfunction(spec.fn) else type(spec.fn)
    assert documented.__doc__ and documented.__doc__.strip()
    for key, param in spec.params.items():
        assert param.doc.strip()
        assert param.check(param.default, field=key) == param.default
    assert get_spec(spec.name, kind=spec.kind) is spec


def test_names_and_aliases_are_unique_within_each_kind():
    for kind in KINDS:
        keys = [key for spec in specs(kind) for key in (spec.name, *spec.aliases)]
        assert len(keys) == len(set(keys)), kind
    # across kinds only the f-divergence weights share names with the token divergences
    shared = {spec.name for spec in specs("token")} & {spec.name for spec in specs("f_divergence")}
    assert shared == {"forward_kl", "reverse_kl"}


def test_register_refuses_duplicates_before_adding_anything():
    before = specs()
    with pytest.raises(ValueError, match="already registered"):
        register("jsd", kind="token", formula="f", paper="p")(lambda: None)
    with pytest.raises(ValueError, match="'kl' is already registered"):
        register_spec("fresh_divergence", kind="token", fn=lambda: None, formula="f", paper="p", aliases=("kl",))
    with pytest.raises(ValueError, match="kind must be one of"):
        register_spec("fresh_divergence", kind="nope", fn=lambda: None, formula="f", paper="p")
    with pytest.raises(ValueError, match="formula and a paper"):
        register_spec("fresh_divergence", kind="token", fn=lambda: None, formula="", paper="p")
    assert specs() == before
    with pytest.raises(ValueError, match="unknown loss"):
        get_spec("fresh_divergence")


# ---------------------------------------------------------------------------------------------
# 2. Declared parameters are the functions' keyword parameters, with the same defaults
# ---------------------------------------------------------------------------------------------

def _keyword_defaults(fn, *, exclude=frozenset()):
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude}


@pytest.mark.parametrize("spec", specs("token"), ids=_ids(specs("token")))
def test_token_params_equal_the_signature(spec):
    signature = inspect.signature(spec.fn)
    assert list(signature.parameters)[:3] == ["student_logits", "teacher_logits", "mask"]
    assert TOKEN_COMMON <= set(signature.parameters)
    assert spec.defaults() == _keyword_defaults(spec.fn, exclude=TOKEN_COMMON)


@pytest.mark.parametrize("spec", specs("classifier"), ids=_ids(specs("classifier")))
def test_classifier_params_equal_the_signature(spec):
    assert list(inspect.signature(spec.fn).parameters)[:3] == ["student_logits", "teacher_logits", "labels"]
    assert spec.defaults() == _keyword_defaults(spec.fn)


@pytest.mark.parametrize("spec", specs("feature") + specs("diffusion"), ids=_ids(specs("feature") + specs("diffusion")))
def test_feature_and_diffusion_params_are_signature_parameters_with_the_same_default(spec):
    parameters = inspect.signature(spec.fn).parameters
    for key, param in spec.params.items():
        assert key in parameters and parameters[key].default == param.default, key


# ---------------------------------------------------------------------------------------------
# 3. Param.check and check_params
# ---------------------------------------------------------------------------------------------

UNIT = Param(0.5, "float", low=0, high=1, doc="a weight")
POSITIVE = Param(1.0, "float", low=0, low_open=True, doc="a scale")
BELOW_ONE = Param(0.1, "float", low=0, high=1, high_open=True, doc="a mixing weight")
COUNT = Param(20, "int", low=1, doc="a count")


@pytest.mark.parametrize("param, value", [
    (UNIT, float("nan")), (UNIT, float("inf")), (UNIT, -float("inf")), (POSITIVE, float("inf")),
    (POSITIVE, float("nan")), (UNIT, -1e-9), (UNIT, 1 + 1e-9), (POSITIVE, 0.0), (POSITIVE, -1.0),
    (BELOW_ONE, 1.0), (BELOW_ONE, -0.1), (UNIT, True), (UNIT, False), (COUNT, True), (UNIT, "abc"), (UNIT, ""),
    (UNIT, None), (UNIT, [0.5]), (COUNT, 2.5), (COUNT, "2.5"), (COUNT, 0), (COUNT, float("inf")), (UNIT, "nan"),
])
def test_param_check_refuses(param, value):
    with pytest.raises(LossParameterError) as error:
        param.check(value, field="objective.x")
    assert isinstance(error.value, ValueError)
    assert error.value.field == "objective.x" and error.value.fix
    assert str(error.value).startswith("objective.x must") and param.range in str(error.value)


@pytest.mark.parametrize("param, value, expected", [
    (UNIT, "1e-3", 1e-3), (UNIT, " 0.25 ", 0.25), (UNIT, 0, 0.0), (UNIT, 1, 1.0), (POSITIVE, "2", 2.0),
    (BELOW_ONE, 0.0, 0.0), (COUNT, "20", 20), (COUNT, 3.0, 3), (COUNT, "1e2", 100),
])
def test_param_check_accepts_and_coerces(param, value, expected):
    checked = param.check(value, field="x")
    assert checked == expected and type(checked) is type(expected)


def test_param_messages_name_the_field_the_range_and_the_value():
    with pytest.raises(LossParameterError, match=r"^objective\.beta must be in \[0, 1\], got 1\.5$"):
        UNIT.check(1.5, field="objective.beta")
    with pytest.raises(LossParameterError, match=r"\(0, inf\).*got nan"):
        POSITIVE.check(float("nan"), field="epsilon")
    assert UNIT.describe("beta") == "beta=0.5 in [0, 1]"
    assert COUNT.describe("iterations") == "iterations=20, an integer in [1, inf)"
    assert interval(None, None) == "(-inf, inf)" and interval(0, 1, high_open=True) == "[0, 1)"
    flag = Param(False, "bool", doc="a switch")
    assert flag.check(True, field="f") is True
    with pytest.raises(LossParameterError, match="true or false"):
        flag.check(1, field="f")
    choice = Param("l2", "str", choices=("l2", "pseudo_huber"), doc="a distance")
    with pytest.raises(LossParameterError, match="l2 | pseudo_huber"):
        choice.check("l1", field="kind")
    optional = Param(None, "float", low=0, low_open=True, doc="optional")
    assert optional.check(None, field="c") is None and optional.check("0.5", field="c") == 0.5


def test_param_definition_errors():
    with pytest.raises(ValueError, match="doc"):
        Param(0.5, "float", low=0, high=1)
    with pytest.raises(ValueError, match="default"):
        Param(2.0, "float", low=0, high=1, doc="out of its own range")
    with pytest.raises(ValueError, match="kind"):
        Param(1, "complex", doc="no such kind")
    assert math.isinf(Param(1.0, "float", allow_inf=True, doc="x").check("inf", field="x"))


def test_check_params_fills_defaults_coerces_and_names_fields():
    assert check_params("jsd", {}) == {"beta": 0.5}
    assert check_params("sinkhorn", {"epsilon": "1e-3", "iterations": 5.0}, kind="token") == \
        {"epsilon": 1e-3, "iterations": 5}
    assert check_params("abkd", {"alpha": 2}, kind="token") == {"alpha": 2.0, "beta": 0.5}  # aliases resolve
    with pytest.raises(LossParameterError) as error:
        check_params("kd", {"temperature": 0}, kind="classifier", field_prefix="objective.terms.0")
    assert error.value.field == "objective.terms.0.temperature" and "(0, inf)" in str(error.value)


def test_check_params_refuses_an_unknown_key_naming_the_parameters():
    with pytest.raises(LossParameterError) as error:
        check_params("jsd", {"betta": 0.3}, kind="token")
    message = str(error.value)
    assert error.value.field == "objective.betta" and "`betta`" in message and "beta=0.5 in [0, 1]" in message
    assert "did you mean `beta`" in message
    with pytest.raises(LossParameterError, match="its parameters: none"):
        check_params("forward_kl", {"beta": 0.3}, kind="token")


def test_get_spec_resolves_aliases_and_explains_unknown_and_ambiguous_names():
    assert get_spec("kl", kind="token") is get_spec("forward_kl", kind="token")
    assert get_spec("sinkd").name == "sinkhorn" and get_spec("kd").kind == "classifier"
    with pytest.raises(LossParameterError, match=r"unknown loss 'jds' among the token losses; did you mean 'jsd'"):
        get_spec("jds", kind="token")
    with pytest.raises(LossParameterError, match="forward_kl, reverse_kl, jsd"):
        get_spec("nope", kind="token")
    with pytest.raises(LossParameterError, match=r"several kinds \(token, f_divergence\)"):
        get_spec("reverse_kl")
    assert get_spec("reverse_kl", kind="f_divergence").fn is not get_spec("reverse_kl", kind="token").fn
    with pytest.raises(ValueError, match="kind must be one of"):
        specs("tokens")


def test_check_number_is_the_functions_check():
    assert check_number("x", 3, 1, None, integer=True) == 3
    for bad in (True, "1", float("nan"), float("inf"), 0.5):
        with pytest.raises(LossParameterError, match="^x must"):
            check_number("x", bad, 1, None, integer=True)


# ---------------------------------------------------------------------------------------------
# 4. The declared ranges and the functions' own checks agree
# ---------------------------------------------------------------------------------------------

def _call(spec, **params):
    """Run spec.fn on small valid inputs with `params`."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if spec.kind == "token":
        return spec.fn(randn(2, 3, 5), randn(2, 3, 5), **params)
    if spec.kind == "classifier":
        return spec.fn(randn(4, 5), randn(4, 5), torch.tensor([0, 1, 2, 4]), **params)
    if spec.kind == "feature":
        return spec.fn(randn(4, 3, 5), randn(4, 3, 5), **params)
    if spec.name == "edm_denoising":
        return spec.fn(randn(3, 4), randn(3, 4), 1.0, **params)
    if spec.name == "consistency":
        return spec.fn(randn(3, 4), randn(3, 4), **{"kind": "pseudo_huber", **params})
    if spec.name == "f_divergence_weight":
        return spec.fn("js", randn(5), **params)
    if spec.name == "uld":
        return spec.fn(randn(2, 3, 5), randn(2, 4, 7), torch.ones(2, 3, dtype=torch.bool),
                       torch.ones(2, 4, dtype=torch.bool), **params)
    if spec.name == "gold_hybrid":
        return spec.fn(randn(3, 5).softmax(-1), randn(3, 7).softmax(-1), torch.tensor([0, 2]), torch.tensor([1, 3]),
                       **params)
    if spec.name == "alm":
        return spec.fn(-randn(2, 3).abs(), -randn(2, 3).abs(), student_boundary=-randn(2, 3).abs(),
                       teacher_boundary=-randn(2, 3).abs(), **params)
    if spec.kind == "preference" and spec.inputs == "sequence":
        first, second = -randn(3).abs(), -randn(3).abs()
        if spec.name == "redi":
            return spec.fn(first, torch.tensor([1, 2, 3]), second, torch.tensor([2, 2, 1]), **params)
        return spec.fn(first, second, -randn(3).abs(), -randn(3).abs(), **params)
    if spec.name == "dckd":
        mask = torch.ones(2, 3, dtype=torch.bool)
        return spec.fn(randn(2, 3, 5), randn(2, 3, 5), mask, randn(2, 3, 5), randn(2, 3, 5), mask, **params)
    if spec.name == "adpa":
        return spec.fn(randn(2, 3, 5), randn(2, 3, 5), randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool), **params)
    raise AssertionError(f"no inputs for {spec.name}")


def _outside(param):
    """Values just outside the declared range (and non-finite ones), each end."""
    values = [float("nan"), float("inf"), -float("inf")]
    step = 1 if param.kind == "int" else 1e-6
    if param.low is not None:
        values.append(param.low if param.low_open else param.low - step)
    if param.high is not None:
        values.append(param.high if param.high_open else param.high + step)
    return values


def _inside(param):
    """The closed ends themselves, and the default."""
    values = [param.default]
    if param.low is not None and not param.low_open:
        values.append(param.low)
    if param.high is not None and not param.high_open:
        values.append(param.high)
    return values


NUMERIC = [(spec, key) for spec in ALL_SPECS if spec.kind != "f_divergence"
           for key, param in spec.params.items() if param.kind in ("float", "int")]


@pytest.mark.parametrize("spec, key", NUMERIC, ids=[f"{spec.name}.{key}" for spec, key in NUMERIC])
def test_value_outside_the_declared_range_is_refused_by_check_params_and_by_the_function(spec, key):
    param = spec.params[key]
    for value in _outside(param):
        with pytest.raises(LossParameterError):
            check_params(spec.name, {key: value}, kind=spec.kind)
        with pytest.raises(ValueError, match=key):
            _call(spec, **{key: value})
    for value in _inside(param):
        if value is None:
            continue
        params = check_params(spec.name, {key: value}, kind=spec.kind)
        assert torch.isfinite(torch.as_tensor(_call(spec, **{key: params[key]}))).all()


def test_every_bounded_token_parameter_is_covered():
    bounded = {(spec.name, key) for spec in specs("token") for key, param in spec.params.items()
               if param.low is not None or param.high is not None}
    assert bounded == {("jsd", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"), ("adaptive_kl", "mu"),
                       ("taid", "t"), ("sinkhorn", "epsilon"), ("sinkhorn", "iterations")}
    assert bounded <= {(spec.name, key) for spec, key in NUMERIC}


# ---------------------------------------------------------------------------------------------
# 5. Per-loss properties
# ---------------------------------------------------------------------------------------------

def test_properties_that_used_to_be_special_cases_by_name():
    assert [s.name for s in specs("token") if not s.token_separable] == ["sinkhorn"]
    assert [s.name for s in ALL_SPECS if s.schedule] == ["taid"] and get_spec("taid").schedule == "taid"
    assert [s.name for s in specs("classifier") if not s.needs_teacher] == ["ce"]
    assert [s.name for s in specs("feature") if s.needs_class_means] == ["nd"]
    assert get_spec("nd").needs_labels and not get_spec("fitnets").needs_labels
    assert [s.name for s in specs("feature") if s.equal_shapes] == ["fitnets", "cosine", "nd"]
    assert {s.name: s.min_examples for s in specs("feature") if s.min_examples > 1} == \
        {"rkd_distance": 2, "rkd_angle": 3, "cka": 2}
    assert not get_spec("bdkd").needs_labels and all(
        get_spec(name, kind="classifier").needs_labels for name in ("kd", "dkd", "nkd", "pld", "ofa", "ce"))
    assert [s.name for s in specs("diffusion") if not s.is_objective] == \
        ["f_divergence_weight", "progressive_distillation_target"]


@pytest.mark.parametrize("name, size", [("rkd_distance", 2), ("rkd_angle", 3), ("cka", 2)])
def test_min_examples_is_what_the_function_needs(name, size):
    fn = get_spec(name, kind="feature").fn
    assert torch.isfinite(fn(torch.randn(size, 4), torch.randn(size, 6)))
    with pytest.raises(ValueError, match=f"at least {size}"):
        fn(torch.randn(size - 1, 4), torch.randn(size - 1, 6))


def test_ce_is_the_hard_label_cross_entropy_without_a_teacher():
    generator = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(6, 4, generator=generator), torch.randint(0, 4, (6,), generator=generator)
    ce = get_spec("ce", kind="classifier").fn
    torch.testing.assert_close(ce(logits, None, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="labels is None"):
        ce(logits, None, None)


def test_bdkd_takes_the_classifier_signature_and_ignores_labels():
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    bdkd = get_spec("bdkd", kind="classifier").fn
    torch.testing.assert_close(bdkd(student, teacher, torch.zeros(5, dtype=torch.long), gamma=3.0),
                               bdkd(student, teacher, gamma=3.0))


def test_f_divergence_specs_hold_f_and_the_log_weight():
    log_r = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for spec in specs("f_divergence"):
        r = log_r.exp()
        # h(r) = f''(r) r^2, by autograd twice
        r_var = r.clone().requires_grad_(True)
        first, = torch.autograd.grad(spec.fn.f(r_var).sum(), r_var, create_graph=True)
        second, = torch.autograd.grad(first.sum(), r_var)
        torch.testing.assert_close(spec.fn(log_r).exp(), second * r**2, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. One registry: no parallel tables of names, formulas or papers beside it
# ---------------------------------------------------------------------------------------------

def test_no_parallel_tables_remain():
    from distill.losses import classic, diffusion, family, features, fused, logits

    old = {losses: ["REGISTRY", "FORMULAS", "PAPERS", "ALIASES", "NOT_TOKEN_SEPARABLE", "get_loss", "loss_parameters"],
           logits: ["REGISTRY", "FORMULAS", "PAPERS", "ALIASES", "NOT_TOKEN_SEPARABLE", "get_loss"],
           family: ["FAMILY_REGISTRY"], fused: ["not_token_separable"],
           classic: ["CLASSIC_REGISTRY", "CLASSIC_FORMULAS", "CLASSIC_PAPERS", "get_classic_loss",
                     "classic_parameters"],
           features: ["FEATURE_REGISTRY", "FEATURE_FORMULAS", "FEATURE_PAPERS", "NEEDS_EQUAL_SHAPES"],
           diffusion: ["DIFFUSION_OBJECTIVES", "DIFFUSION_FORMULAS", "DIFFUSION_PAPERS", "FDIVERGENCES",
                       "FDIVERGENCE_WEIGHTS"]}
    for module, names in old.items():
        assert [name for name in names if hasattr(module, name)] == [], module.__name__


def test_loss_spec_is_frozen_and_its_params_read_only():
    spec = get_spec("jsd", kind="token")
    assert isinstance(spec, LossSpec)
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.params["gamma"] = Param(1.0, doc="x")  # type: ignore[index]
