"""End to end through the `distill` command: every shipped recipe at tiny size, the demo, the
run directory's contents, and refusing to overwrite a finished run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "distill" / "recipes").glob("*.yaml"))
TINY = ["--set", "train.steps=2", "--set", "train.warmup_steps=0", "--set", "train.batch_size=4",
        "--set", "data.train_size=16", "--set", "data.eval_size=4", "--set", "eval.every=1",
        "--set", "eval.generate_size=2", "--set", "eval.throughput_tokens=2"]
TINY_CLASSIFIER = ["--set", "train.epochs=0.5", "--set", "data.train_size=128", "--set", "data.eval_size=100",
                   "--set", "eval.every_epochs=0.25"]
TINY_DIFFUSION = ["--set", "train.steps=4", "--set", "train.batch_size=16", "--set", "eval.samples=100",
                  "--set", "eval.teacher_steps=[1,2]", "--set", "objective.start_steps=8"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_runs_at_tiny_size(recipe, run_cli, tmp_path):
    out = tmp_path / "run"
    text = recipe.read_text()
    classifier, diffusion = "task: classifier" in text, "task: diffusion" in text
    overrides = [*(TINY_CLASSIFIER if classifier else TINY_DIFFUSION if diffusion else TINY), "--set", f"output={out}"]
    if "kind: cache" in recipe.read_text():  # the teacher's top-k is cached first
        overrides += ["--set", f"regime.path={tmp_path / 'cache'}"]
        built = run_cli("cache", str(recipe), *overrides, cwd=ROOT)
        assert built.returncode == 0, built.stderr[-3000:]
    if "runs/arithmetic-sft/student" in text:  # (OPD) the SFT student from the same teacher, made first
        sft = run_cli("run", str(ROOT / "recipes" / "arithmetic.yaml"), *TINY, "--set", f"output={tmp_path / 'sft'}",
                      "--set", "train.baseline=false", cwd=ROOT)
        assert sft.returncode == 0, sft.stderr[-3000:]
        overrides += ["--set", f"student.path={tmp_path / 'sft' / 'student'}"]
    if "rollouts:" in text:  # offline OPD: the student's samples, the teacher's scores of them
        overrides += ["--set", f"regime.rollouts={tmp_path / 'rollouts'}", "--set", f"regime.path={tmp_path / 'scores'}"]
        for command in ("rollouts", "cache"):
            done = run_cli(command, str(recipe), *overrides, cwd=ROOT)
            assert done.returncode == 0, done.stderr[-3000:]
    result = run_cli("run", str(recipe), *overrides, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    if diffusion:  # rows: the teacher per step count, the student per step count, the noise floor
        assert "teacher euler 2" in results["rows"] and "data (noise floor)" in results["rows"]
        assert any(name.startswith("student") for name in results["rows"])
        return
    if classifier and "kind: self" in text:  # the student's own EMA is its teacher: no teacher row
        assert list(results["rows"]) == ["alone", "distilled"]
    elif "same_tokenizer_reference: true" in text:  # a cross-tokenizer run's reference row
        assert list(results["rows"]) == ["teacher", "same_tokenizer", "alone", "distilled"]
    elif "assistants:" in text:  # a teacher chain: each assistant's row
        assert list(results["rows"]) == ["teacher", "assistant 1", "alone", "distilled"]
    elif "baseline: false" in text:  # no `alone` row
        assert list(results["rows"]) == ["teacher", "distilled"]
    else:
        assert list(results["rows"]) == ["teacher", "alone", "distilled"]
    speed = "examples_per_second" if classifier else "generation_tokens_per_second"
    for row in results["rows"].values():
        expected = {"nll", "parameters", speed, results["meta"]["primary_metric"]}
        cross = "loss: alm" in text  # different tokenizers: no per-token agreement with the teacher
        assert expected | (set() if classifier or cross else {"teacher_top1_agreement"}) <= row.keys()
    if "alone" in results["rows"]:
        assert results["rows"]["alone"]["parameters"] == results["rows"]["distilled"]["parameters"]
    if "privacy:" in text:  # a private student: the epsilon it spent
        assert results["rows"]["distilled"]["epsilon"] > 0 and "differentially private" in result.stdout
    primary = results["meta"]["primary_metric"]
    assert "distilled" in result.stdout and (primary in result.stdout or primary.replace("_", " ") in result.stdout)


def test_run_directory_holds_everything_a_user_needs(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(tiny_recipe)
    result = run_cli("run", str(recipe), "--set", "train.steps=3", "--set", "objective.loss=jsd",
                     "--set", "objective.beta=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "losses.jsonl", "results.json", "report.md", "report.html",
                 "plots/loss.png", "plots/eval_metric.png", "plots/token_kl.png", "student/config.json", "student/model.safetensors",
                 "student/tokenizer.json", "alone/config.json", "checkpoints/distilled/state.json"):
        assert (run / name).exists(), name
    saved = (run / "recipe.yaml").read_text()
    assert "beta: 0.25" in saved and "steps: 3" in saved  # the resolved recipe, overrides applied
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["step"]) for e in evals] == [("distilled", 2), ("distilled", 3), ("alone", 2), ("alone", 3)]
    html = (run / "report.html").read_text()
    # self-contained: losses, the eval curves and the per-token histograms
    assert html.count("data:image/png;base64,") == 3 and 'src="http' not in html
    # A saved student is a normal transformers model.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(run / "student")
    AutoTokenizer.from_pretrained(run / "student")

    again = run_cli("run", str(recipe))
    assert again.returncode == 2 and "finished run" in again.stderr and "--overwrite" in again.stderr
    assert (run / "results.json").exists()  # nothing lost
    listed = run_cli("report", str(run))
    assert listed.returncode == 0 and "distilled" in listed.stdout


def test_overwrite_replaces_a_finished_run_but_never_a_foreign_directory(tiny_recipe, write_recipe, run_cli, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    recipe = write_recipe({**tiny_recipe, "output": str(foreign)})
    refused = run_cli("run", str(recipe), "--overwrite")
    assert refused.returncode == 2 and "not a distill run" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "precious"


def test_demo_command_at_tiny_size(run_cli, tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--output", str(out), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "oracle_forward_kl" in result.stdout and (out / "results.json").exists()


def test_losses_command_lists_every_registered_loss_under_its_recipe_field():
    """`distill losses` (in process): one table per kind, titled with the recipe field that names its losses;
    every registered name and alias, with its parameters' ranges."""
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.losses import KINDS, specs

    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    output = result.output
    titles = [line.strip() for line in output.splitlines() if " losses - task " in line]
    assert [title.split(" losses")[0] for title in titles] == list(KINDS)
    for kind, field in [("token", "objective.loss"), ("classifier", "objective.terms[].loss"),
                        ("feature", "objective.terms[].loss"), ("diffusion", "student.method"),
                        ("f_divergence", "objective.divergence"), ("cross_token", "objective.loss")]:
        assert field in titles[KINDS.index(kind)], (kind, titles)
    rows = []  # each table row's cells, its wrapped lines joined (a name cell is empty on continuation lines)
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            if cells[0] or not rows:
                rows.append(cells)
            else:
                rows[-1] = [f"{before} {after}".strip() for before, after in zip(rows[-1], cells)]
    listed = {row[0]: row for row in rows}
    for spec in specs():
        aliases = f" ({', '.join(spec.aliases)})" if spec.aliases else ""
        assert spec.name + aliases in listed, spec.name
    assert len(rows) == len(specs())  # each once: f-divergences and token losses share names, not tables
    assert listed["jsd"][2] == "beta=0.5 in [0, 1]"
    assert listed["sinkhorn (sinkd)"][2] == "epsilon=0.1 in (0, inf), iterations=20, an integer in [1, inf)"
    assert listed["sinkhorn (sinkd)"][3] == "couples tokens: no fused path" and listed["taid"][3] == "schedule: taid"
    assert listed["progressive_distillation_target"][3] == "not an objective itself: a piece of one"


def test_eval_and_compare_lm_runs(tiny_recipe, run_cli, tmp_path):
    import distill

    first = distill.run({**tiny_recipe, "output": str(tmp_path / "fkl")})
    second = distill.run({**tiny_recipe, "output": str(tmp_path / "jsd"), "objective": {"loss": "jsd"}})
    done = run_cli("eval", first.run_dir, "--output", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert list(rows) == ["teacher", "alone", "distilled"]
    for row, metrics in first.rows.items():
        assert rows[row]["nll"] == pytest.approx(metrics["nll"], rel=1e-6)
        assert rows[row]["oracle_forward_kl"] == pytest.approx(metrics["oracle_forward_kl"], rel=1e-6)
    # The run's student alone on another eval set of the task (a run's student/ defaults to its run's recipe).
    lone = run_cli("eval", first.run_dir / "student", "--data", "builtin:oracle", "--set", "data.eval_size=4",
                   "--output", tmp_path / "lone.json")
    assert lone.returncode == 0, lone.stderr[-3000:]
    assert list(json.loads((tmp_path / "lone.json").read_text())["rows"]) == ["model"]
    compared = run_cli("compare", first.run_dir, second.run_dir, "--output", tmp_path / "cmp")
    assert compared.returncode == 0, compared.stderr[-3000:]
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "fkl / distilled" in markdown and "jsd / distilled" in markdown and " *" in markdown
    assert markdown.index("KL(oracle‖m)") < markdown.index("nll")  # the primary metric first
    assert (tmp_path / "cmp" / "plots" / "eval_curves.png").is_file()
    one = run_cli("compare", first.run_dir)
    assert one.returncode == 2 and "two or more" in one.stderr


def test_train_teacher_goes_to_the_family_of_the_task(run_cli, tmp_path):
    # digits has a classifier teacher (the default) and a diffusion teacher (--family diffusion / --diffusion).
    classifier = run_cli("train-teacher", "builtin:digits", "--epochs", "0.05", "--out", tmp_path / "cnn")
    assert classifier.returncode == 0, classifier.stderr[-3000:]
    assert (tmp_path / "cnn" / "classifier.json").is_file() and "accuracy" in classifier.stdout
    denoiser = run_cli("train-teacher", "builtin:gmm2d", "--steps", "3", "--out", tmp_path / "gmm")
    assert denoiser.returncode == 0, denoiser.stderr[-3000:]
    assert (tmp_path / "gmm" / "denoiser.json").is_file()
    wrong = run_cli("train-teacher", "builtin:digits", "--family", "lm", "--out", tmp_path / "x")
    assert wrong.returncode == 2 and "--family" in wrong.stderr and "classifier" in wrong.stderr
    unknown = run_cli("train-teacher", "builtin:nothing", "--out", tmp_path / "y")
    assert unknown.returncode == 2 and "builtin:oracle" in unknown.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("args,message", [
    (("evaluate",), "Did you mean 'eval'?"), (("run",), "Missing argument"), (("run", "--bogus", "x.yaml"),
                                                                              "No such option: --bogus"),
    (("demo", "--seed", "abc"), "Invalid value for '--seed'"), (("losses", "extra"), "unexpected extra argument")])
def test_usage_errors_answer_like_a_command_line(run_cli, args, message):
    """Click's short usage message and exit 2, never a traceback (issue 18, item 0)."""
    finished = run_cli(*args)
    assert finished.returncode == 2
    assert "Usage: " in finished.stderr and message in finished.stderr  # (the program name is argv[0])
    assert "Traceback" not in finished.stderr + finished.stdout


def test_bare_distill_prints_the_help_and_exits_0(run_cli):
    finished = run_cli()
    assert finished.returncode == 0, finished.stderr
    assert "Usage" in finished.stdout + finished.stderr and "demo" in finished.stdout + finished.stderr
