"""Shared fixtures: a tiny saved teacher, recipe helpers and a CLI runner.

The machine has 2 CPU cores shared with other jobs, so torch uses one thread in every test
process and in every CLI subprocess. Nothing here touches the network: models are built from
configs and saved to temporary directories, and the hub is switched to offline mode.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

torch.set_num_threads(1)

# Property and fuzz tests (hypothesis): in CI (CI set) a fixed seed, so a run is reproducible and a failure
# points at a change, not at luck; locally random, so each run explores new inputs (and replays the failures
# kept in .hypothesis/). A test's own @settings (example counts, derandomize) take precedence.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
hypothesis_settings.register_profile("local", deadline=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "local")

# Sizes of the tiny teacher in `tiny_lm_dir` (tests that rebuild it in memory use the same).
TINY_TEACHER_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    return env


def run_distill_cli(*args: str, cwd: str | Path | None = None, timeout: float = 300,
                    env: dict[str, str] | None = None, isolated: bool = False) -> subprocess.CompletedProcess:
    """`distill ARGS` as a user runs it: exit code, stdout and stderr (a CompletedProcess).

    In this test process by default (the CLI's own `main`, with argv, the working directory and `env` set
    for the call, stdout/stderr captured, warnings printed to stderr as a fresh interpreter would, and
    SystemExit turned into the exit code): a new interpreter per call would spend ~3 s importing torch and
    transformers, over a minute of the suite. `isolated=True` runs `python -m distill ARGS` in a subprocess
    (one torch thread) for what only a process of its own shows. DistillErrors come back as exit code 2 with
    `error <field>: <message>\n  fix: ...` on stderr. Plain function so module- or session-scoped fixtures
    can call it too (see `run_cli`)."""
    if isolated:
        return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], cwd=cwd,
                              env={**_cli_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return _run_cli_here([str(a) for a in args], cwd, env or {})


def _run_cli_here(args: list[str], cwd, env: dict[str, str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback
    import warnings

    from distill import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env = {key: os.environ.get(key) for key in env}
    saved_argv, saved_cwd, saved_threads = sys.argv, os.getcwd(), torch.get_num_threads()

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    code = 0
    try:
        os.environ.update(env)
        sys.argv = ["distill", *args]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # as a fresh interpreter: each warning once per place
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = show
            try:
                cli.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, (int, type(None))):  # the interpreter prints a message code
                    err.write(f"{exit_.code}\n")
            except Exception:  # an uncaught error: a traceback and exit code 1, as the interpreter gives
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["distill", *args], code, out.getvalue(), err.getvalue())


def launch_two_processes(*distill_args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m distill ARGS` (CPU, gloo), on a free rendezvous
    port of its own: two such tests may run at once on the two pytest-xdist workers."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), "-m", "distill", *map(str, distill_args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


@contextmanager
def serving(model_dir, *, api_key=None, max_batch_tokens=16384, port=None, exit_after_scoring=None, name="teacher"):
    """The teacher at `model_dir` (a directory or `builtin:` name) served by `distill serve`'s app under uvicorn on
    127.0.0.1 (a free port, or `port`), in a thread of this process; yields the base URL (no /v1).
    `exit_after_scoring=N`: after answering N scoring requests the server fails every further one and shuts down,
    as a server that dies."""
    import uvicorn

    from distill.lm.models import load_causal_lm, load_tokenizer
    from distill.lm.teacher.serve import TeacherEngine, build_app

    engine = TeacherEngine(load_causal_lm(str(model_dir), "teacher"), load_tokenizer(str(model_dir), "teacher"),
                           name=name, max_batch_tokens=max_batch_tokens)
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    app = build_app(engine, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    if exit_after_scoring is not None:
        score, answered = engine.score, []

        def counted(*args, **kwargs):
            if len(answered) >= exit_after_scoring:  # answered 500 until the shutdown, then connections refused
                server.should_exit = True
                raise RuntimeError("the server is going down")
            answered.append(1)
            return score(*args, **kwargs)
        engine.score = counted
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def run_cli():
    """A function `run_cli(*args, cwd=None, env=None, isolated=False)` -> CompletedProcess of `distill ARGS`
    (`env` adds environment variables for the call; see `run_distill_cli`)."""
    return run_distill_cli


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A directory with a tiny random Llama causal LM (hidden 32, 2 layers, 4 heads) and the
    oracle task's word-level tokenizer, both written with save_pretrained. Stands in for a
    teacher (`teacher: {path: str(tiny_lm_dir)}`). Session-scoped: do not modify it."""
    from transformers import AutoModelForCausalLM

    from distill.lm.models import tiny_llama_config
    from distill.lm.tasks.oracle import OracleTask

    directory = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = OracleTask().tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), **TINY_TEACHER_SHAPE))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def write_recipe(tmp_path):
    """A function `write_recipe(recipe_dict, name="recipe.yaml")` -> Path of the YAML written in tmp_path."""

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_recipe(tiny_lm_dir, tmp_path) -> dict:
    """A minimal valid recipe dict: the tiny teacher, a 1-layer student, 32 oracle examples,
    4 steps, output in tmp_path/run. A fresh dict per test: edit it freely."""
    return tiny_recipe_for(tiny_lm_dir, tmp_path)


def tiny_recipe_for(tiny_lm_dir: Path, tmp_path: Path) -> dict:
    """`tiny_recipe` as a plain function (for module-scoped fixtures)."""
    return {
        "teacher": {"path": str(tiny_lm_dir)},
        "student": {"config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 32}},
        "data": {"builtin": "oracle", "train_size": 32, "eval_size": 8},
        "train": {"steps": 4, "batch_size": 4, "threads": 1, "checkpoint_every": 2, "log_every": 1},
        "eval": {"every": 2, "batch_size": 8, "generate_size": 4, "throughput_tokens": 4},
        "output": str(tmp_path / "run"),
    }


def run_interrupted_and_resumed(recipe: dict, tmp_path: Path, monkeypatch, crash_after: int = 2):
    """(straight, resumed) RunResults of one recipe: run straight through, and run again killed
    after the step-`crash_after` checkpoint, then continued with resume=True."""
    import distill

    straight = distill.run({**recipe, "output": str(tmp_path / "straight")})
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", str(crash_after))
    with pytest.raises(SystemExit):
        distill.run({**recipe, "output": str(tmp_path / "resumed")})
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    return straight, distill.run({**recipe, "output": str(tmp_path / "resumed")}, resume=True)


def assert_same_student(first_run_dir: Path, second_run_dir: Path) -> None:
    """Bit-identical student weights in two run directories."""
    from safetensors.torch import load_file

    first = load_file(str(first_run_dir / "student" / "model.safetensors"))
    second = load_file(str(second_run_dir / "student" / "model.safetensors"))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


# ---- losses: shared inputs of the loss tests --------------------------------------------------

# p_S = [.5, .5] (logits [0, 0]) and p_T = [.75, .25] (logits [ln 3, 0]): hand-computable values.
HAND_STUDENT = torch.tensor([[0.0, 0.0]])
HAND_TEACHER = torch.tensor([[math.log(3.0), 0.0]])


def random_loss_inputs(shape, dtype=torch.float64, seed=0, requires_grad=True):
    """(student logits, teacher logits, mask) of `shape` [..., V]: logits ~ 3 N(0, 1), about 70% of
    tokens valid and the first always."""
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    mask = torch.rand(shape[:-1], generator=generator) < 0.7
    mask.view(-1)[0] = True
    return student.requires_grad_(requires_grad), teacher.requires_grad_(requires_grad), mask


# The slowest tests (~10-50 s each, measured with --durations) start first, slowest first: pytest-xdist hands
# tests out in collection order, and a long one collected late runs alone at the end while the other worker
# idles. Update the list when --durations shows a new one above ~8 s.
LONGEST_FIRST = ("test_sharding.py::test_fsdp_run_from_a_saved_student", "test_soak.py::",
                 "test_reliability.py::test_a_killed_rank", "test_train.py::test_two_processes_train_one_model",
                 "test_preference.py::test_two_processes", "test_sharding.py::test_two_process_fsdp",
                 "test_cross_tokenizer.py::test_the_other_direction", "test_diffusion_effects.py::",
                 "test_reliability.py::test_a_run_that_hits_a_file_size_limit", "test_effect.py::",
                 "test_sweep.py::test_classifier_sweep", "test_sweep.py::test_a_killed_parallel",
                 "test_sweep.py::test_lm_and_diffusion", "test_privacy.py::test_private_classifier",
                 "test_cache.py::test_two_processes", "test_lm_eval.py::test_unknown_task",
                 "test_train.py::test_interrupted_run_resumed", "test_architecture.py::test_a_family_loads")


def _slowness(item) -> int:
    return next((rank for rank, marker in enumerate(LONGEST_FIRST) if marker in item.nodeid), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slowness)  # stable: the rest keep their order
