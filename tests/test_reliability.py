"""Issue 18: bad input is answered before anything is written; unexpected failures leave a log and a
resumable run."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.core.errors import DistillError
from distill.core.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# The objectives a new user tried on main: six crashed at the first training step with a traceback (after the
# teacher evaluation, leaving an "unfinished run"), and an infinite temperature trained.
REFUSED_OBJECTIVES = [
    ({"loss": "jsd", "beta": 1.5}, "objective.beta", "[0, 1]"),
    ({"loss": "jsd", "beta": -0.1}, "objective.beta", "[0, 1]"),
    ({"loss": "skew_kl", "alpha": 2}, "objective.alpha", "[0, 1)"),
    ({"loss": "adaptive_kl", "mu": 1.5}, "objective.mu", "[0, 1]"),
    ({"loss": "sinkhorn", "epsilon": -1}, "objective.epsilon", "(0, inf)"),
    ({"loss": "taid", "taid": {"t_start": 0.9, "t_end": 0.1}}, "objective.taid.t_start", "must not exceed t_end"),
    ({"loss": "forward_kl", "temperature": float("inf")}, "objective.temperature", "finite"),
    ({"loss": "forward_kl", "temperature": float("nan")}, "objective.temperature", "finite"),
    ({"loss": "jsd", "beta": float("nan")}, "objective.beta", "finite"),
]


def _oracle_recipe(objective: dict, output) -> dict:
    recipe = yaml.safe_load((RECIPES / "oracle-jsd.yaml").read_text())
    return {**recipe, "objective": objective, "output": str(output)}


@pytest.mark.parametrize("objective,field,allowed", REFUSED_OBJECTIVES)
def test_out_of_range_objectives_are_refused_with_the_field_and_range(objective, field, allowed, tmp_path):
    with pytest.raises(DistillError) as caught:
        load_recipe(_oracle_recipe(objective, tmp_path / "run"))
    text = caught.value.render()
    assert f"{field}:" in text and allowed in text and "fix:" in text


@pytest.mark.parametrize("source,sets,field", [
    (str(RECIPES / "oracle-jsd.yaml"), ["train.lr=.inf"], "train.lr"),
    (str(RECIPES / "oracle-jsd.yaml"), ["regime.kind=on_policy", "regime.top_p=.nan"], "regime.top_p"),
    (str(RECIPES / "mnist5k-kd.yaml"), ["objective.terms=[{loss: kd, temperature: .inf}]"], "objective.terms.0.temperature"),
    (str(RECIPES / "mnist5k-kd.yaml"), ["objective.terms=[{loss: kd, weight: .nan}]"], "objective.terms.0.weight"),
    (str(RECIPES / "mnist5k-kd.yaml"), ["objective.terms=[{loss: dkd, alpha: -1}]"], "objective.terms.0.alpha"),
    (str(RECIPES / "gmm2d-dmd.yaml"), ["train.sigma_max=.inf"], "train.sigma_max"),
    (str(RECIPES / "gmm2d-consistency.yaml"), ["objective.ema_decay=1.5"], "objective.ema_decay"),
    (str(RECIPES / "gmm2d-dmd.yaml"), ["objective.divergence=kl_forward"], "objective.divergence"),
])
def test_every_family_refuses_non_finite_and_out_of_range_numbers(source, sets, field):
    with pytest.raises(DistillError) as caught:
        load_recipe(source, sets)
    assert f"{field}:" in caught.value.render()


def test_refused_objective_through_the_cli_exits_2_and_writes_nothing(run_cli, write_recipe, tmp_path):
    for objective, field, allowed in (REFUSED_OBJECTIVES[0], REFUSED_OBJECTIVES[5], REFUSED_OBJECTIVES[6]):
        output = tmp_path / "run"
        finished = run_cli("run", write_recipe(_oracle_recipe(objective, output)))
        assert finished.returncode == 2, finished.stderr
        assert field in finished.stderr and allowed in finished.stderr
        assert "Traceback" not in finished.stderr
        assert not output.exists()


def test_an_empty_recipe_file_is_called_empty(run_cli, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing yet\n")
    finished = run_cli("run", empty)
    assert finished.returncode == 2
    assert "is empty" in finished.stderr and "required field" not in finished.stderr


def test_an_unexpected_failure_is_one_line_and_a_log_and_the_run_resumes(tiny_recipe, write_recipe, run_cli,
                                                                         tmp_path):
    """An exception that is not a DistillError: exit 1, one line naming it, the traceback in <run>/error.log
    (and on stderr with --debug); --resume finishes the run as if nothing happened."""
    recipe = write_recipe(tiny_recipe)
    crash = {"DISTILL_CRASH_AFTER_STEP": "2", "DISTILL_CRASH_KIND": "exception"}
    failed = run_cli("run", recipe, env=crash)
    assert failed.returncode == 1, failed.stderr[-2000:]
    run_dir = tmp_path / "run"
    log = run_dir / "error.log"
    assert "unexpected failure: RuntimeError: DISTILL_CRASH_AFTER_STEP=2" in failed.stderr
    assert str(log) in failed.stderr and "--resume" in failed.stderr and "Traceback" not in failed.stderr
    assert "Traceback (most recent call last)" in log.read_text() and "simulate_crash_after" in log.read_text()
    debug = run_cli("--debug", "run", recipe, "--overwrite", env=crash)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    resumed = run_cli("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "results.json").is_file()


@pytest.mark.parametrize("args", [
    ("cache", "{recipe}", "--k", "0", "--out", "cache"),
    ("cache", "{recipe}", "--set", "teacher.path=missing", "--out", "cache"),
    ("cache", "{recipe}", "--values", "int4", "--out", "cache"),
    ("eval", "missing", "--output", "out/rows.json"),
    ("compare", "a", "b", "--output", "compared"),
    ("train-teacher", "builtin:oracle", "--out", "teacher", "--lr", "-1"),
    ("train-teacher", "builtin:digits", "--out", "teacher", "--epochs", "nan"),
    ("serve", "missing", "--port", "1"),
], ids=["cache-k0", "cache-teacher", "cache-values", "eval", "compare", "train-teacher-lr", "train-teacher-epochs",
        "serve"])
def test_every_command_refuses_bad_input_before_writing_anything(args, run_cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES / "oracle-cache.yaml").read_text())
    finished = run_cli(*[a.format(recipe=recipe) for a in args], cwd=tmp_path)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr and "fix:" in finished.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_continues(tiny_recipe, write_recipe, run_cli,
                                                                          tmp_path):
    """Checkpoints are checksummed and the one before is kept: a resume that finds the newest damaged warns,
    continues from the previous one and ends with the same student, history and rows as a straight run."""
    import json

    from safetensors.torch import load_file

    recipe = write_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "steps": 6}})
    straight = run_cli("run", recipe, "--set", f"output={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "run"
    crashed = run_cli("run", recipe, env={"DISTILL_CRASH_AFTER_STEP": "4"})
    assert crashed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "distilled" / "state.json").read_text())["step"] == 4
    assert json.loads((checkpoints / "distilled.previous" / "state.json").read_text())["step"] == 2
    _flip_a_byte(checkpoints / "distilled" / "model.safetensors")
    resumed = run_cli("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "model.safetensors does not match its checksum" in resumed.stderr and "(step 2)" in resumed.stderr
    assert (checkpoints / "distilled.damaged" / "model.safetensors").is_file()
    for name in ("metrics.jsonl",):
        assert (run_dir / name).read_text() == (tmp_path / "straight" / name).read_text()
    first = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    second = load_file(str(run_dir / "student" / "model.safetensors"))
    import torch

    assert all(torch.equal(first[key], second[key]) for key in first)


def test_both_checkpoints_damaged_is_refused_with_the_fix(tmp_path):
    import torch

    from distill.core.checkpoint import find_checkpoint, save_checkpoint

    directory = tmp_path / "checkpoints" / "distilled"
    model = torch.nn.Linear(3, 2)
    for step in (2, 4):
        save_checkpoint(directory, modules={"model": model}, state={"step": step})
    assert find_checkpoint(directory) == directory  # whole: no warning, no move
    _flip_a_byte(directory / "model.safetensors")
    _flip_a_byte(directory.with_name("distilled.previous") / "state.json")
    with pytest.raises(DistillError) as caught:
        find_checkpoint(directory)
    assert "--overwrite" in caught.value.render() and "state.json does not match" in caught.value.render()


# ---- full disks and read-only directories ------------------------------------------------------------------

def _mount_tmpfs(where, options: str) -> bool:
    """A tmpfs at `where` (root in a container can; elsewhere the test that needs it is skipped)."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where) -> None:
    import subprocess

    done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
    if done.returncode != 0:  # still busy: detach it now, the kernel frees it when the last user goes
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _distill_process(*args, limit_bytes: int | None = None, cwd=None):
    """`python -m distill ARGS` in a process of its own, optionally under a file-size limit (RLIMIT_FSIZE, with
    SIGXFSZ ignored so that a write past it fails with EFBIG, as on a full disk)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, env=env, cwd=cwd, timeout=300)


def test_a_run_that_hits_a_file_size_limit_stops_clearly_and_resumes(tiny_recipe, write_recipe, run_cli, tmp_path):
    """Under RLIMIT_FSIZE 100 kB (a process of its own) the checkpoints (48 kB files) fit and the report (~180 kB)
    does not: the run stops naming its directory, its checkpoints verify, and --resume without the limit (in
    this process) finishes it."""
    import json

    from distill.core.checkpoint import checkpoint_problem

    run_dir = tmp_path / "run"
    recipe = write_recipe(tiny_recipe)
    failed = _distill_process("run", recipe, limit_bytes=100_000)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"the disk holding `{run_dir}` is full" in failed.stderr and "Traceback" not in failed.stderr
    assert "--resume" in failed.stderr and not (run_dir / "results.json").exists()
    for phase in ("distilled", "alone"):
        checkpoint = run_dir / "checkpoints" / phase
        assert checkpoint_problem(checkpoint) is None
        assert json.loads((checkpoint / "state.json").read_text())["step"] == tiny_recipe["train"]["steps"]
    resumed = run_cli("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "results.json").is_file() and (run_dir / "report.html").stat().st_size > 100_000


def test_a_run_on_a_full_file_system_keeps_its_last_checkpoint(tiny_recipe, write_recipe, run_cli, tmp_path):
    """A real ENOSPC: the run directory on a 600 kB tmpfs (a tiny run writes ~800 kB). The run stops with the
    directory named and its checkpoints whole; after the file system grows (remount), --resume finishes. (That
    a resumed run equals one that never stopped is the soak's to show, tests/test_soak.py.) The CLI runs in this
    process (run_cli): a full disk needs no process of its own."""
    from distill.core.checkpoint import checkpoint_problem

    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=600k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        run_dir = mount / "run"
        recipe = write_recipe({**tiny_recipe, "output": str(run_dir)})
        failed = run_cli("run", recipe)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert f"the disk holding `{run_dir}` is full" in failed.stderr and "Traceback" not in failed.stderr
        assert not (run_dir / "results.json").exists()
        checkpoints = [d for d in (run_dir / "checkpoints").iterdir() if (d / "state.json").is_file()]
        assert checkpoints and all(checkpoint_problem(d) is None for d in checkpoints)
        import subprocess

        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        resumed = run_cli("run", recipe, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (run_dir / "results.json").is_file()
    finally:
        _umount(mount)


def test_a_read_only_output_directory_is_refused_before_anything_runs(tiny_recipe, write_recipe, run_cli, tmp_path):
    import os

    mount = tmp_path / "readonly"
    if not _mount_tmpfs(mount, "ro,size=1m"):
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and mounting a read-only tmpfs is not permitted here")
        mount.mkdir(exist_ok=True)
        mount.chmod(0o555)
    try:
        for args in (("run", write_recipe({**tiny_recipe, "output": str(mount / "run")})),
                     ("cache", write_recipe({**tiny_recipe, "regime": {"kind": "cache", "path": str(mount / "c")}},
                                            "cache.yaml")),
                     ("train-teacher", "builtin:oracle", "--out", mount / "teacher", "--steps", "2")):
            finished = run_cli(*args)
            assert finished.returncode == 2, finished.stderr[-2000:]
            assert "cannot be written" in finished.stderr and ("Read-only" in finished.stderr
                                                               or "Permission" in finished.stderr)
        assert list(mount.iterdir()) == []
    finally:
        _umount(mount)


# ---- multi-process faults -------------------------------------------------------------------------------------

def _process_of_rank(rank: int, launcher_pid: int) -> int | None:
    """The pid of the `distill` worker with RANK=rank started by the launcher (read from /proc)."""
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)": state, ppid, ...
        if b"distill" in cmd and b"accelerate" not in cmd and f"RANK={rank}".encode() in env \
                and int(fields[1]) == launcher_pid and fields[0] != "Z":
            return int(pid)
    return None


def test_a_killed_rank_stops_the_other_at_once_with_a_clear_message_and_resume_continues(tiny_recipe, write_recipe,
                                                                                         tmp_path):
    """2 processes (gloo): rank 0, the one that writes, is SIGKILLed after the first checkpoint. Rank 1 says that
    another process stopped (no hang: the launcher returns within a minute), the run directory keeps the
    checkpoint, and relaunching with --resume finishes the run."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from conftest import launch_two_processes

    run_dir = tmp_path / "run"
    recipe = write_recipe({**tiny_recipe, "data": {**tiny_recipe["data"], "train_size": 256},
                           "train": {**tiny_recipe["train"], "steps": 400, "baseline": False}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "distill",
         "run", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "distilled" / "state.json").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        victim = _process_of_rank(0, launcher.pid)
        assert victim is not None
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=60)  # no hang: TimeoutExpired fails the test
        took = time.time() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0 and took < 60
    # rank 1's collective fails first ("another process of this run stopped"), or, on a loaded machine, the
    # launcher's SIGTERM reaches it first ("stopped by its launcher ... another process of this run failed")
    assert "rank 1: another process of this run stopped" in output or (
        "rank 1: stopped by its launcher" in output), output[-3000:]
    # the only traceback is the launcher's own report (torch elastic's ChildFailedError), none from distill
    assert "--resume" in output and output.count("Traceback (most recent call last)") <= 1
    assert (run_dir / "error-rank1.log").is_file() or "rank 1: stopped by its launcher" in output
    step = json.loads((run_dir / "checkpoints" / "distilled" / "state.json").read_text())["step"]
    assert 0 < step < 400
    resumed = launch_two_processes("run", str(recipe), "--resume", "--set", "train.steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    assert (run_dir / "results.json").is_file()


def test_no_pickle_anywhere_in_the_package_and_no_remote_code_by_default():
    """Trainer state is safetensors + JSON (core.checkpoint); nothing in the package unpickles (torch.load only
    with weights_only=True), and trust_remote_code is on only where a recipe field says so."""
    import re

    from distill.lm.recipe import StudentSpec, TeacherSpec

    package = Path(__file__).resolve().parents[1] / "distill"
    for file in package.rglob("*.py"):
        text = file.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), file
        assert "pickle.load" not in text and "joblib.load" not in text, file
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{file}: {call.group(0)}"
        assert "trust_remote_code=True" not in text.replace(" ", ""), file
    assert TeacherSpec.model_fields["trust_remote_code"].default is False
    assert StudentSpec.model_fields["trust_remote_code"].default is False
