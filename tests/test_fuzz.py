"""Fuzzing (hypothesis): generated recipes and data files go through the real validation and loading, and each
either passes or ends in a DistillError naming a field or the file (and line), never another exception.

- recipes: the shipped recipes of each family with random keys at every depth, values of the wrong type,
  out-of-range and non-finite numbers, huge ints, unknown names and sections deleted; random YAML-ish
  structures; raw random text (and bytes) as the YAML file; `--set` strings (`load_recipe`, `apply_override`).
- data: jsonl / json / parquet files (broken JSON, wrong or missing fields, empty strings, long rows, non-UTF-8,
  parquet of the wrong schema, empty files, mixed formats) and csv / tsv / txt / arrow files and `save_to_disk`
  directories, read by `distill.lm.data.load_data` with the oracle task's tokenizer, then the eval scorer, as
  a run does before any model loads.

Example counts are bounded (the whole file takes well under a minute on one core); the `ci` profile of
conftest.py fixes the seed when CI is set. The regression tests at the end pin each bug the fuzzing found.
"""
from __future__ import annotations

import copy
import json
import os
import re
import typing
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from distill.core.errors import DistillError
from distill.core.families import get_family
from distill.core.recipe import apply_override, load_recipe
from distill.lm.data import load_data
from distill.lm.records import row_problem
from distill.lm.recipe import DataSpec, EvalSpec
from distill.lm.tasks.completions import CompletionsScorer
from distill.lm.tasks.oracle import OracleTask
from distill.losses import specs

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "distill" / "recipes").glob("*.yaml"))
RECIPES = [yaml.safe_load(path.read_text()) for path in SHIPPED]
BASES = {family: [recipe for recipe in RECIPES if recipe["task"] == family]
         for family in ("lm", "classifier", "diffusion")}


def fuzz(max_examples: int) -> settings:
    """The settings of a fuzz test: `max_examples` examples (times DISTILL_FUZZ_SCALE, to search longer by hand),
    no deadline; the rest from the conftest profile."""
    return settings(max_examples=max_examples * int(os.environ.get("DISTILL_FUZZ_SCALE", "1")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- what an error must name ------------------------------------------------------------------------

def assert_names_field_or_file(error: DistillError, *paths: Path) -> None:
    """The error names a recipe field (its `field`, or a `field.path: message` line per problem of a pydantic
    error, none of them the whole recipe) or one of `paths`."""
    text = error.render()
    if any(str(path) in text for path in paths) or error.field:
        return
    head, *problems = error.message.split("\n")
    assert head == "invalid recipe" and problems, text
    for problem in problems:
        assert problem.startswith("  ") and ": " in problem and not problem.startswith("  recipe:"), text


def validates_or_names(load, *paths: Path):
    """load() -> the recipe, or None after checking the DistillError it raised; any other exception fails."""
    try:
        recipe = load()
    except DistillError as error:
        assert_names_field_or_file(error, *paths)
        return None
    # A valid recipe is written to the run directory resolved and read back on --resume: it must stay valid.
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.model_dump(mode="json") == recipe.model_dump(mode="json")
    if recipe.task == "lm":  # the self regime formats it for every row, after the models load
        recipe.regime.privileged_template.format(privileged="p", prompt="q")
    return recipe


# ---- recipe strategies ------------------------------------------------------------------------------

def field_names(model: type[BaseModel]) -> set[str]:
    """Every field name of a recipe class and of the sections below it."""
    names, pending = set(), [model]
    while pending:
        current = pending.pop()
        for name, field in current.model_fields.items():
            names.add(name)
            types = [field.annotation]
            while types:
                annotation = types.pop()
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    pending.append(annotation)
                types.extend(typing.get_args(annotation))
    return names


FIELDS = sorted(set().union(*(field_names(get_family(f).recipe_class()) for f in BASES)))
NAMES = sorted({spec.name for spec in specs()} | {"lm", "classifier", "diffusion", "off_policy", "on_policy", "opd",
                                                   "sequence", "self", "cache", "frozen", "multi_teacher", "online",
                                                   "dmd", "consistency", "progressive", "mlp", "cnn", "oracle",
                                                   "digits", "gmm2d", "mnist5k", "arithmetic", "builtin:oracle-teacher",
                                                   "forward_kl_", "not_a_loss", "", " "})
# (below Python's 4300-digit limit of printing an int, which hypothesis needs to report an example; past it: the
# regression tests)
HUGE = st.sampled_from([2**63, -2**63 - 1, 10**30, -10**30, 10**400, 10**4000])
NUMBERS = st.one_of(st.integers(-10**6, 10**6), HUGE, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 0.0, -0.0, 1e-320, 1e308, 2.5, 0.5, 1.0]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=16), st.sampled_from(NAMES))
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), st.integers(-3, 3), st.none(), st.booleans())
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                    max_leaves=6)


def containers(node, path=()):
    """(path, node) of every dict and list in a recipe, the root first."""
    if isinstance(node, (dict, list)):
        yield path, node
        for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
            yield from containers(child, (*path, key))


@st.composite
def mutated_recipe(draw, family: str) -> dict:
    """A shipped recipe of `family` after 1-4 random edits: a key inserted, a value replaced, a key deleted."""
    recipe = copy.deepcopy(draw(st.sampled_from(BASES[family])))
    for _ in range(draw(st.integers(1, 4))):
        _, node = draw(st.sampled_from(list(containers(recipe))))
        operation = draw(st.sampled_from(["insert", "replace", "replace", "delete"]))
        if isinstance(node, dict):
            if operation == "insert" or not node:
                node[draw(KEYS)] = draw(JUNK)
            elif operation == "delete":
                del node[draw(st.sampled_from(list(node)))]
            else:
                node[draw(st.sampled_from(list(node)))] = draw(JUNK)
        elif operation == "insert" or not node:
            node.insert(draw(st.integers(0, len(node))), draw(JUNK))
        elif operation == "delete":
            node.pop(draw(st.integers(0, len(node) - 1)))
        else:
            node[draw(st.integers(0, len(node) - 1))] = draw(JUNK)
    return recipe


def as_source(recipe, directory: Path, through_file: bool):
    """The recipe as load_recipe takes it: a dict, or a YAML file (when it can be written as YAML)."""
    if through_file:
        try:
            text = yaml.safe_dump(recipe, sort_keys=False)
        except ValueError:  # an int past Python's 4300-digit str limit cannot be written
            return recipe, None
        path = directory / "recipe.yaml"
        path.write_text(text)
        return path, path
    return recipe, None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("family", list(BASES))
@fuzz(300)
@given(data=st.data())
def test_mutated_recipes_validate_or_name_the_field(family, data, scratch):
    recipe = data.draw(mutated_recipe(family))
    source, path = as_source(recipe, scratch, data.draw(st.booleans()))
    validates_or_names(lambda: load_recipe(source), *([path] if path else []))


SECTION_NAMES = ["task", "name", "output", "teacher", "student", "data", "objective", "regime", "train", "eval",
                 "teachers", "log"]


@fuzz(200)
@given(recipe=st.dictionaries(st.one_of(st.sampled_from(SECTION_NAMES), KEYS), JUNK, max_size=6),
       task=st.one_of(st.none(), st.sampled_from(list(BASES)), SCALARS), through_file=st.booleans())
def test_random_structures_validate_or_name_the_field(recipe, task, through_file, scratch):
    if task is not None:
        recipe["task"] = task
    source, path = as_source(recipe, scratch, through_file)
    validates_or_names(lambda: load_recipe(source), *([path] if path else []))


YAMLISH = st.one_of(st.text(max_size=200), st.binary(max_size=200),
                    st.lists(st.sampled_from(["task: lm", "task: [", "teacher:", "  path: x", "- a", "? [a]", ": b",
                                              "&a [*a]", "*a", "!!python/name:os.system", "\t", "{", "}", "'", '"',
                                              "name: 2024-13-01", "train: {lr: 1e999}", "data: {builtin: oracle}",
                                              "x: !!binary AAAx", "%YAML 1.1", "---", "...", "\x00", "\xff"]),
                             max_size=8).map("\n".join))


@fuzz(200)
@given(content=YAMLISH)
def test_raw_text_as_the_recipe_file_validates_or_names_the_file(content, scratch):
    path = scratch / "raw.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    validates_or_names(lambda: load_recipe(path), path)


OVERRIDE_VALUES = st.one_of(st.text(max_size=20), JUNK.map(lambda value: json.dumps(value, default=str)),
                            st.sampled_from(["[", "{a: [", ".nan", "-.inf", "1e999", "9" * 5000, "2024-13-01",
                                             "!!python/object:os.system", "&a [*a]", "[" * 600, "", " ", "null",
                                             "{}", "[]", "~", "yes", "0x10", "1_000"]))


@st.composite
def override(draw, base: dict) -> str:
    """A `--set` string: a path into the recipe (or random text), perhaps deeper, `=`, a value."""
    paths = [".".join(map(str, path)) for path, _ in containers(base) if path] + list(map(str, base))
    key = draw(st.one_of(st.sampled_from(paths), st.text(max_size=12)))
    if draw(st.booleans()):
        key += "." + draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)))
    return key + draw(st.sampled_from(["=", "=", "", "=="])) + draw(OVERRIDE_VALUES)


@fuzz(300)
@given(data=st.data())
def test_set_overrides_validate_or_name_the_field(data):
    family = data.draw(st.sampled_from(list(BASES)))
    base = data.draw(st.sampled_from(BASES[family]))
    assignments = data.draw(st.lists(override(base), min_size=1, max_size=3))
    try:
        apply_override(copy.deepcopy(base), assignments[0])
    except DistillError as error:
        assert error.field == "--set", error.render()
    validates_or_names(lambda: load_recipe(base, assignments))


# ---- data strategies --------------------------------------------------------------------------------

WORD_LIST = [f"w{i}" for i in range(64)] + ["unknown", "", " ", "\u2028", "\x85", "é"]
# Texts of parquet and csv files, then of JSON rows, which also hold lone surrogates (a "\ud800" escape).
PLAIN_TEXTS = st.one_of(st.lists(st.sampled_from(WORD_LIST), max_size=12).map(" ".join), st.text(max_size=30),
                        st.just(""), st.just("w1 " * 3000))  # a huge row among them
TEXTS = st.one_of(PLAIN_TEXTS, st.lists(st.sampled_from([*WORD_LIST, "\ud800"]), max_size=4).map(" ".join))
GOOD_ROWS = st.one_of(
    st.fixed_dictionaries({"prompt": TEXTS, "completion": TEXTS}),
    st.fixed_dictionaries({"text": TEXTS}),
    st.builds(lambda turns: {"messages": [{"role": role, "content": content} for role, content in turns]},
              st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), TEXTS), min_size=1, max_size=3)))
ROW_KEYS = st.sampled_from(["prompt", "completion", "text", "messages", "id", "role", "content", "question"])
BAD_ROWS = st.one_of(
    JUNK,  # not an object, or an object of anything
    st.dictionaries(ROW_KEYS, JUNK, max_size=4),  # known keys, wrong values
    st.builds(lambda row, key, value: {**row, key: value}, GOOD_ROWS, ROW_KEYS, JUNK),
    st.builds(lambda messages: {"messages": messages}, st.lists(st.dictionaries(ROW_KEYS, JUNK, max_size=3),
                                                                max_size=3)))
ROWS = st.lists(st.one_of(GOOD_ROWS, GOOD_ROWS, BAD_ROWS), max_size=8)
BROKEN_LINES = st.sampled_from(['{"prompt": "w1"', "{", "[", "[" * 100_000, "not json", "\ufeff{}", "NaN", "1e999",
                                '{"text": "w1"}{"text": "w2"}', '"just a string"', "\x00", "null"])


def jsonl_bytes(rows: list, broken: list[str], line_end: str, ascii_only: bool = False) -> bytes:
    """jsonl: the rows, then the broken lines (`ascii_only`: escapes such as \\ud800, else the characters)."""
    lines = [json.dumps(row, ensure_ascii=ascii_only, default=str) for row in rows] + broken
    return line_end.join(lines).encode("utf-8", "surrogatepass")


PARQUET_TYPES = {"string": (pa.string(), PLAIN_TEXTS), "int": (pa.int64(), st.integers(-5, 5)),
                 "float": (pa.float64(), st.floats(allow_nan=True)), "bool": (pa.bool_(), st.booleans()),
                 "list": (pa.list_(pa.int64()), st.lists(st.integers(0, 3), max_size=2)),
                 "struct": (pa.struct([("role", pa.string()), ("content", pa.string())]),
                            st.fixed_dictionaries({"role": PLAIN_TEXTS, "content": PLAIN_TEXTS})),
                 "null": (pa.null(), st.none()),
                 "binary": (pa.binary(), st.binary(max_size=8))}


@st.composite
def parquet_table(draw, min_columns: int = 0) -> pa.Table:
    """A table of 0-5 rows and `min_columns`-3 columns named like ours or not, of any type, with nulls."""
    rows = draw(st.integers(0, 5))
    columns = {}
    for name in draw(st.lists(ROW_KEYS, min_size=min_columns, max_size=3, unique=True)):
        kind, values = PARQUET_TYPES[draw(st.sampled_from(sorted(PARQUET_TYPES)))]
        columns[name] = pa.array(draw(st.lists(st.one_of(st.none(), values), min_size=rows, max_size=rows)), kind)
    return pa.table(columns) if columns else pa.table({"x": pa.array([None] * rows, pa.null())}).drop(["x"])


@st.composite
def data_file(draw, directory: Path, stem: str) -> Path:
    """A jsonl / json / parquet file (its suffix may lie about its content), or an empty or non-UTF-8 one."""
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".json", ".parquet"]))
    path = directory / f"{stem}{suffix}"
    kind = draw(st.sampled_from(["jsonl", "jsonl", "json", "parquet", "empty", "bytes"]))
    if kind == "parquet":
        pq.write_table(draw(parquet_table()), path)
        return path
    if kind == "jsonl":
        broken = draw(st.lists(BROKEN_LINES, max_size=2))
        content = jsonl_bytes(draw(ROWS), broken, draw(st.sampled_from(["\n", "\r\n", "\n\n"])), draw(st.booleans()))
    elif kind == "json":
        content = json.dumps(draw(st.one_of(ROWS, JUNK)), default=str).encode()
        content = content[:draw(st.integers(0, len(content)))] if draw(st.booleans()) else content  # cut short
    else:
        content = b"" if kind == "empty" else jsonl_bytes(draw(ROWS), [], "\n")
    if content and draw(st.booleans()):  # a stray byte that is not UTF-8
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"])) + content[at:]
    path.write_bytes(content)
    return path


@st.composite
def data_spec(draw, train: Path, evaluation: Path | None) -> DataSpec:
    fields = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["prompt", "completion", "text", "messages"]),
                                                       ROW_KEYS, min_size=1, max_size=2)))
    return DataSpec(train=str(train), eval=str(evaluation) if evaluation else None, fields=fields,
                    eval_size=draw(st.integers(1, 3)), max_length=draw(st.integers(2, 64)),
                    too_long=draw(st.sampled_from(["truncate", "refuse"])), completion_only=draw(st.booleans()),
                    packing=draw(st.booleans()))


def loads_or_names_the_file(spec: DataSpec, tokenizer, *files: Path) -> None:
    """What a run does with the data before any model loads; a DistillError must name the file it is about,
    and a jsonl line it names must be that row's line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rows cut to max_length
            _, eval_records, _, _ = load_data(spec, tokenizer, None)
            CompletionsScorer.for_eval(EvalSpec(), eval_records, tokenizer)
    except DistillError as error:
        text = error.render()
        named = [path for path in files if f"`{path}`" in text]
        assert named, text
        line = re.search(r"` line (\d+)( is not JSON|:)", text)
        if named[0].suffix == ".jsonl" and spec.fields is None and line:
            content = named[0].read_bytes().decode("utf-8").split("\n")[int(line.group(1)) - 1]
            try:
                row = json.loads(content)
            except (json.JSONDecodeError, RecursionError):
                assert line.group(2) == " is not JSON", text
            else:
                assert line.group(2) == ":" and row_problem(row) is not None, text


@pytest.fixture(scope="module")
def oracle_tokenizer():
    return OracleTask().tokenizer()


@fuzz(300)
@given(data=st.data())
def test_data_files_load_or_name_the_file_and_line(data, scratch, oracle_tokenizer):
    train = data.draw(data_file(scratch, "train"))
    evaluation = data.draw(st.one_of(st.none(), data_file(scratch, "eval")))
    loads_or_names_the_file(data.draw(data_spec(train, evaluation)), oracle_tokenizer,
                            *[p for p in (train, evaluation) if p])


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """Hugging Face datasets' cache in a temporary directory (each generated csv would leave an entry), quiet."""
    import datasets

    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = saved
    datasets.enable_progress_bars()


@st.composite
def dataset_input(draw, directory: Path) -> Path:
    """A csv / tsv / txt / arrow file of any content (csv, json, binary), or a `save_to_disk` directory, whole
    or with a file broken."""
    kind = draw(st.sampled_from([".csv", ".csv", ".tsv", ".txt", ".arrow", "save_to_disk"]))
    if kind == "save_to_disk":
        import datasets

        table = draw(parquet_table(min_columns=1))
        path = directory / f"saved{draw(st.integers(0, 10**9))}"
        datasets.Dataset(table).save_to_disk(str(path))
        victim = draw(st.sampled_from([None, "state.json", "dataset_info.json", "data-00000-of-00001.arrow"]))
        if victim:
            (path / victim).write_bytes(draw(st.sampled_from([b"", b"{", b"[]", b'{"_data_files": 3}', b"\xff"])))
        return path
    path = directory / f"data{kind}"
    cells = st.one_of(PLAIN_TEXTS, st.sampled_from(['"', '""', ",", "\t", "prompt", "completion", "text"]))
    content = draw(st.one_of(
        st.lists(st.lists(cells, max_size=4).map(",".join), max_size=5).map("\n".join).map(str.encode),
        st.builds(jsonl_bytes, ROWS, st.just([]), st.just("\n")),
        st.binary(max_size=64)))
    path.write_bytes(content)
    return path


@fuzz(40)
@given(data=st.data())
def test_dataset_files_and_directories_load_or_name_the_path(data, scratch, oracle_tokenizer, datasets_cache):
    train = data.draw(dataset_input(scratch))
    spec = DataSpec(train=str(train), eval_size=1, max_length=32)
    loads_or_names_the_file(spec, oracle_tokenizer, train)


# ---- regressions: each bug the fuzzing found ---------------------------------------------------------

LM_BASE = yaml.safe_load((REPO / "recipes" / "oracle-jsd.yaml").read_text())


def refused(source, overrides=()) -> DistillError:
    with pytest.raises(DistillError) as raised:
        load_recipe(source, overrides)
    return raised.value


def test_a_loss_parameter_past_float_range_is_refused_by_name():  # was OverflowError (check_number)
    error = refused({**LM_BASE, "objective": {"loss": "jsd", "beta": 10**400}})
    assert "objective.beta" in error.message and "integer of" in error.message
    classifier = yaml.safe_load((REPO / "recipes" / "mnist5k-kd.yaml").read_text())
    error = refused({**classifier, "objective": {"terms": [{"loss": "kd", "temperature": 10**400}]}})
    assert "objective.terms.0.temperature" in error.message


def test_an_int_too_long_to_print_is_refused_by_name():  # was ValueError: Exceeds the limit (4300 digits)
    huge = 10**5000
    assert "train.lr" in refused({**LM_BASE, "train": {"lr": huge}}).message
    assert "too large to print" in refused({**LM_BASE, "name": huge}).message
    assert refused({**LM_BASE, "task": huge}).field == "task"
    assert "Keys should be strings (got an int too large to print)" in refused({**LM_BASE, huge: 1}).message
    assert "train.steps" in refused(LM_BASE, ["train.steps=" + "9" * 5000]).message


@pytest.mark.parametrize("content, expected", [
    (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at line 1"),  # was UnicodeDecodeError
    (b"a: " + b"[" * 5000, "nests more levels than the YAML reader"),  # was RecursionError
    (b"name: 2024-13-01\n", "has a value YAML cannot read: month must be in 1..12"),  # was ValueError
    (b"- teacher\n- student\n", "holds a list, not a recipe"),  # named no file
])
def test_unreadable_recipe_files_name_the_file(tmp_path, content, expected):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    error = refused(path)
    assert str(path) in error.message and expected in error.message, error.render()


def test_deep_or_self_holding_recipes_name_the_place():  # was RecursionError; then ValueError writing recipe.yaml
    nested = 1
    for _ in range(1000):
        nested = [nested]
    assert refused({**LM_BASE, "student": {"config": {"a": nested}}}).field == "student.config.a..."
    assert refused(LM_BASE, ["student.config.a=" + "[" * 150 + "]" * 150]).field == "student.config.a..."
    error = refused(LM_BASE, ["student.config.a=&x [*x]"])
    assert error.field == "student.config.a.0" and "holds itself" in error.message


def test_odd_keys_are_quoted_in_field_paths():  # an empty key was reported as the field `recipe`
    assert "\n  '': unknown key" in refused({**LM_BASE, "": None}).message
    error = refused({**LM_BASE, "objective": {"loss": "forward_kl", "\n": 1}})
    assert "objective.'\\n'" in error.message and "`'\\n'` is not a parameter" in error.message


@pytest.mark.parametrize("edit, field", [
    ({"student": {"config": {}, "dtype": "bfloat16"}, "train": {"precision": "fp16"}}, "train.precision"),
    ({"regime": {"kind": "opd", "group_size": 3}, "train": {"batch_size": 4}}, "regime.group_size"),
])
def test_whole_recipe_conflicts_name_a_field(edit, field):  # were reported as the field `recipe`
    assert f"\n  {field}: " in refused({**LM_BASE, **edit}).message


@pytest.mark.parametrize("template", ["{x} {prompt}", "{", "{0}", "{prompt.upper}", "{prompt:d}"])
def test_privileged_template_is_checked_with_the_recipe(template):  # was KeyError etc. after the models loaded
    assert "regime.privileged_template" in refused({**LM_BASE, "regime": {"privileged_template": template}}).message


@pytest.mark.parametrize("section", ["train", "data"])
def test_negative_seeds_are_refused(section):  # numpy refuses them when the first generator is made
    base = {**LM_BASE, "data": {"builtin": "oracle"}}
    assert f"{section}.seed" in refused({**base, section: {**base.get(section, {}), "seed": -1}}).message


def load_file(path: Path, tokenizer, **spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_data(DataSpec(train=str(path), **{"eval_size": 1, **spec}), tokenizer, None)


def data_refused(path: Path, tokenizer, **spec) -> DistillError:
    with pytest.raises(DistillError) as raised:
        load_file(path, tokenizer, **spec)
    assert f"`{path}`" in raised.value.message, raised.value.render()
    return raised.value


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_names_the_file(tmp_path, oracle_tokenizer, suffix):  # was RecursionError
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"text": "w1"}\n' + "[" * 100_000 if suffix == ".jsonl" else "[" * 100_000)
    assert "deeper than the JSON reader" in data_refused(path, oracle_tokenizer).message


@pytest.mark.parametrize("content", [b'prompt,completion\n"w1,w2\n', b"", b"prompt,completion\n\xff\xfe,w1\n"])
def test_unreadable_csv_names_the_file(tmp_path, oracle_tokenizer, datasets_cache, content):
    path = tmp_path / "data.csv"  # was datasets' DatasetGenerationError
    path.write_bytes(content)
    assert "is not a dataset distill can read" in data_refused(path, oracle_tokenizer).message


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": None}]}, "`messages` 0: `content` is None, not a string"),  # ValueError
    ({"prompt": None, "completion": "w1"}, "`prompt` is None, not text"),  # trained on the text "None"
    ({"text": ["w1", "w2"]}, "`text` is ['w1', 'w2'], not text"),  # trained on the text "['w1', 'w2']"
    (["w1"], "the row is a list, not an object"),  # named no file
])
def test_bad_rows_name_the_file_and_line(tmp_path, oracle_tokenizer, row, problem):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "w1"}\n\n' + json.dumps(row) + '\n{"text": "w2"}\n')
    error = data_refused(path, oracle_tokenizer)
    assert f"`{path}` line 3: {problem}" in error.message and error.field == "data.train"


def test_file_errors_after_reading_name_the_file_and_line(tmp_path, oracle_tokenizer):
    path = tmp_path / "rows.jsonl"  # named row indices of the list, not the file's lines
    path.write_text('{"text": "w1"}\n\n{"prompt": "w1", "completion": "w1 w2 w3 w4"}\n{"text": "w2"}\n')
    error = data_refused(path, oracle_tokenizer, max_length=4, too_long="refuse")
    assert f"`{path}` line 3 has 7 tokens, over max_length=4" in error.message
    error = data_refused(path, oracle_tokenizer, eval_size=2, max_length=4, too_long="refuse")  # the eval rows
    assert f"`{path}` line 3 has 7 tokens" in error.message and error.field == "data.max_length"
    path.write_text('{"prompt": "w1 w2 w3 w4", "completion": "w5"}\n' * 3)  # cut before any completion token
    assert "no example of" in data_refused(path, oracle_tokenizer, max_length=3).message
    path.write_text("")
    assert "has no rows" in data_refused(path, oracle_tokenizer).message


def test_line_separators_inside_json_strings_do_not_split_a_row(tmp_path, oracle_tokenizer):
    path = tmp_path / "rows.jsonl"  # U+2028 and friends were line ends: "line 1 is not JSON"
    path.write_text("\n".join(json.dumps({"text": f"w1{separator}w2"}, ensure_ascii=False)
                              for separator in ("\u2028", "\x85", "\x0c", "\x1e")) + "\n")
    train_records, eval_records, _, _ = load_file(path, oracle_tokenizer)
    assert len(train_records) + len(eval_records) == 4


@pytest.mark.parametrize("damage", [b"[]", b'{"_data_files": 3}', b'{"_data_files": []}'])
def test_a_damaged_saved_dataset_names_the_directory(tmp_path, oracle_tokenizer, damage):
    import datasets  # was AttributeError / TypeError / IndexError from load_from_disk

    path = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "w1"}, {"text": "w2"}]).save_to_disk(str(path))
    (path / "state.json").write_bytes(damage)
    assert "save_to_disk directory whose files are damaged" in data_refused(path, oracle_tokenizer).message


def test_text_that_is_not_unicode_is_refused_by_name(tmp_path, oracle_tokenizer):
    # A recipe holding a lone surrogate (a non-UTF-8 byte in a --set argument) validated, then writing the run's
    # recipe.yaml raised UnicodeEncodeError; a "\ud800" escape in a jsonl row was a TypeError of the tokenizer.
    assert refused(LM_BASE, ["name=a\udcffb"]).field == "name"
    assert refused(LM_BASE, ['student.config.a={"\\ud800": 1}']).field == "student.config.a"
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "w1"}\n{"text": "w1 \\ud800"}\n{"text": "w2"}\n')
    assert f"`{path}` line 2: `text` is 'w1 \\ud800', not valid text" in data_refused(path, oracle_tokenizer).message
