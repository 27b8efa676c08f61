"""`distill sweep`: a grid x seeds of normal runs, resumable, parallel, summarized with 95% intervals."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import yaml

import distill
from distill.core.sweep import TIMING, split_values, thread_share

from test_classifier import _recipe as classifier_recipe
from test_diffusion import diffusion_recipe

T_975 = {1: 12.7062047, 2: 4.3026527}  # Student's t quantiles from tables, by degrees of freedom


def quality(rows: dict) -> dict:
    """A row's metrics without wall-clock ones (those differ between any two runs)."""
    return {k: v for k, v in rows["distilled"].items() if not TIMING.search(k)}


def test_split_values_keeps_brackets_and_quotes_whole():
    assert split_values("a, b,[1,2],{x: 1, y: 2},'c,d'") == ["a", "b", "[1,2]", "{x: 1, y: 2}", "'c,d'"]


def test_point_directories_name_paths_by_their_last_part_unless_that_collides(tmp_path, write_recipe):
    from distill.core.sweep import Sweep

    path = write_recipe(classifier_recipe(tmp_path))
    short = Sweep(path, {"teacher.path": ["/a/t1", "/b/t2"]}, 1, output=tmp_path / "s").plan()
    assert [t.slug for t in short] == ["path=t1", "path=t2"]
    clash = Sweep(path, {"teacher.path": ["/a/t", "/b/t"]}, 1, output=tmp_path / "s").plan()
    assert [t.slug for t in clash] == ["path=_a_t", "path=_b_t"]


def test_classifier_sweep_resumes_runs_in_parallel_and_computes_intervals(tmp_path, write_recipe, run_cli,
                                                                           monkeypatch):
    recipe = classifier_recipe(tmp_path, train={"epochs": 2, "batch_size": 64, "lr": 0.003, "log_every": 2,
                                                "checkpoint_every": 4})
    path = write_recipe(recipe)
    grid = ["--grid", "objective.terms.0.temperature=1,4"]
    first = tmp_path / "first"

    # seed 0 of both points, then seeds 0 and 1 with the first new run killed after its step-4 checkpoint
    assert run_cli("sweep", path, *grid, "--seeds", "1", "--output", first).returncode == 0
    finished = {p: p.stat().st_mtime_ns for p in first.glob("*/seed0/results.json")}
    assert len(finished) == 2
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "4")
    assert run_cli("sweep", path, *grid, "--seeds", "2", "--output", first).returncode != 0
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    interrupted = first / "temperature=1" / "seed1"
    assert (interrupted / "recipe.yaml").is_file() and not (interrupted / "results.json").exists()
    resumed = run_cli("sweep", path, *grid, "--seeds", "2", "--output", first)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 runs (2 finished before, 1 to resume)" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs untouched
    assert "distinguishable" in resumed.stdout and "temperature" in resumed.stdout

    # the same sweep from nothing, two runs at a time: the same students as the resumed, one-at-a-time sweep
    second = tmp_path / "second"
    parallel = run_cli("sweep", path, *grid, "--seeds", "2", "--output", second, "--jobs", "2")
    assert parallel.returncode == 0, parallel.stderr
    summary = json.loads((second / "summary.json").read_text())
    runs = list(summary["runs"].values())
    assert len(runs) == 4 and all(run["pid"] != os.getpid() for run in runs)  # in worker processes
    overlap = any(a["start"] < b["end"] and b["start"] < a["end"] for a in runs for b in runs if a is not b)
    assert len({run["pid"] for run in runs}) == 2 or overlap  # two at a time
    for seed_dir in second.glob("*/seed*"):
        twin = first / seed_dir.relative_to(second)
        assert quality(json.loads((seed_dir / "results.json").read_text())["rows"]) == \
            quality(json.loads((twin / "results.json").read_text())["rows"])
        threads = yaml.safe_load((seed_dir / "recipe.yaml").read_text())["train"]["threads"]
        assert threads <= thread_share(2)  # two jobs never ask for more threads than their share of the cores

    # the table: mean and t interval per point, recomputed by hand from each run's results.json
    summary = json.loads((first / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and summary["row"] == "distilled" and summary["interval"] == "t"
    for point in summary["points"]:
        values = [json.loads((first / point["slug"] / f"seed{s}" / "results.json").read_text())
                  ["rows"]["distilled"]["accuracy"] for s in (0, 1)]
        mean, half = sum(values) / 2, T_975[1] * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
        entry = point["intervals"]["accuracy"]
        assert entry["mean"] == pytest.approx(mean) and entry["n"] == 2
        assert (entry["low"], entry["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    means = [p["intervals"]["accuracy"]["mean"] for p in summary["points"]]
    assert summary["best"] == means.index(max(means)) and summary["runner_up"] == 1 - summary["best"]
    assert summary["comparison"]["test"] == "paired t"
    markdown = (first / "sweep.md").read_text()
    assert "(best)" in markdown and "Student's t" in markdown
    assert (first / "plots" / "temperature.png").stat().st_size > 1000
    assert (first / "sweep.html").is_file() and (first / "logs" / "temperature=1-seed1.log").is_file()


def test_bad_grid_and_foreign_directories_are_refused_before_anything_is_written(tmp_path, write_recipe, run_cli):
    path = write_recipe(classifier_recipe(tmp_path))
    out = tmp_path / "sweep"
    bad = run_cli("sweep", path, "--grid", "train.lr=0.01,-1", "--output", out)
    assert bad.returncode == 2 and "--grid train.lr" in bad.stderr and "train.lr=-1" in bad.stderr
    assert not out.exists()
    for args, field in ((["--grid", "train.lr"], "--grid"), (["--seeds", "x"], "--seeds"),
                        (["--grid", "train.seed=1,2"], "--grid train.seed"), (["--interval", "z"], "--interval"),
                        (["--seed-field", "train.nothing"], "--seed-field")):
        result = run_cli("sweep", path, *args, "--output", out)
        assert result.returncode == 2 and f"error {field}" in result.stderr, (args, result.stderr)
        assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("sweep", path, "--output", out)
    assert result.returncode == 2 and "holds no sweep" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_a_point_directory_with_another_recipe_is_refused(tmp_path, write_recipe, run_cli):
    path = write_recipe(classifier_recipe(tmp_path, train={"epochs": 1, "batch_size": 64}))
    out = tmp_path / "sweep"
    assert run_cli("sweep", path, "--seeds", "1", "--output", out).returncode == 0
    before = (out / "base" / "seed0" / "results.json").read_bytes()
    changed = run_cli("sweep", path, "--seeds", "1", "--output", out, "--set", "train.lr=0.01")
    assert changed.returncode == 2 and "holds a run of another recipe" in changed.stderr
    assert "train.lr" in changed.stderr
    assert (out / "base" / "seed0" / "results.json").read_bytes() == before


def test_lm_and_diffusion_sweeps_through_the_python_api(tmp_path, tiny_recipe):
    lm = distill.sweep(tiny_recipe, {"objective.loss": ["forward_kl", "reverse_kl"]}, seeds=2,
                       output=tmp_path / "lm", overrides=["train.baseline=false"])
    assert lm.row == "distilled" and lm.metric == "oracle_forward_kl" and not lm.higher_is_better
    assert [p["point"] for p in lm.points] == [{"objective.loss": "forward_kl"}, {"objective.loss": "reverse_kl"}]
    best = lm.points[lm.best]["intervals"]["oracle_forward_kl"]["mean"]
    assert best == min(p["intervals"]["oracle_forward_kl"]["mean"] for p in lm.points)
    rows = json.loads((tmp_path / "lm" / "loss=forward_kl" / "seed1" / "results.json").read_text())["rows"]
    assert "alone" not in rows and "distilled" in rows  # --set applies to every point
    assert re.search(r"\| forward_kl \| 2 \| ", lm.table())

    diffusion = distill.sweep(diffusion_recipe(tmp_path / "unused", "dmd", train={"steps": 6, "batch_size": 32,
                                                                                 "log_every": 3}),
                              {"objective.divergence": ["js", "reverse_kl"]}, seeds=[0, 1],
                              output=tmp_path / "diffusion")
    assert diffusion.row.startswith("student") and len(diffusion.points) == 2
    assert all(p["intervals"][diffusion.metric]["n"] == 2 for p in diffusion.points)
    assert (tmp_path / "diffusion" / "plots" / "divergence.png").is_file()


def test_a_killed_parallel_sweep_leaves_no_worker_behind_and_resumes(tmp_path, write_recipe, run_cli):
    import signal
    import subprocess
    import sys
    import time

    from conftest import _cli_env

    recipe = classifier_recipe(tmp_path, train={"epochs": 15, "batch_size": 64, "lr": 0.003, "log_every": 10,
                                                "checkpoint_every": 10})
    path = write_recipe(recipe)
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "distill", "sweep", str(path), "--grid", "train.lr=0.003,0.01", "--seeds", "1",
            "--output", str(out), "--jobs", "2"]
    sweep = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/seed0/checkpoints")):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(sweep.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the sweep started no worker"
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 20
    alive = [int(pid) for pid in workers]
    while alive and time.time() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)
    assert not alive, "workers outlived the killed sweep"
    resumed = run_cli("sweep", path, "--grid", "train.lr=0.003,0.01", "--seeds", "1", "--output", out, "--jobs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert len(list(out.glob("*/seed0/results.json"))) == 2


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
