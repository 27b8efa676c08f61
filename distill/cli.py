"""The `distill` command line: demo, run, sweep, select, eval, compare, report, cache, train-teacher, losses, layers.

Every user-fixable problem is a `DistillError`: printed as `field: message` + `fix:`, exit code 2,
no traceback.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.core.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a large teacher model into a small, fast student.")
console = Console(width=None if sys.stdout.isatty() else 140)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

SET_HELP = "Override a recipe field, e.g. --set train.steps=50 (repeatable)."


def _print_result(result, title: str | None = None) -> None:
    from distill.core.report import notes, table_rows

    header, body = table_rows(result.rows, result.meta)
    table = Table(title=title or f"distill: {result.run_dir}")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    for line in notes(result.rows, result.meta):
        console.print(line)
    if result.run_dir is not None and (result.run_dir / "report.html").is_file():
        console.print(f"report: {result.run_dir / 'report.html'}")


def _run(recipe: str, overrides: list[str], resume: bool, overwrite: bool) -> None:
    from distill.core.recipe import load_recipe

    checked = load_recipe(recipe, overrides)  # fails fast, before torch/transformers load
    from distill import run

    result = run(checked, resume=resume, overwrite=overwrite)
    if result is not None:  # None on processes other than rank 0
        _print_result(result)


@app.command("run")
def run_command(recipe: str = typer.Argument(..., help="Recipe YAML (or builtin:<name>)."),
                set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in the output directory.")):
    """Distill a teacher into a student as the recipe says; write the run directory."""
    _run(recipe, set_, resume, overwrite)


@app.command()
def sweep(recipe: str = typer.Argument(..., help="Recipe YAML (or builtin:<name>) every point starts from."),
          grid: List[str] = typer.Option([], "--grid", help="field=value1,value2,... : one axis of the grid "
                                         "(repeatable; values are YAML, e.g. --grid objective.beta=0.1,0.5)."),
          seeds: str = typer.Option("3", "--seeds", help="How many seeds (3: seeds 0, 1, 2) or which (0,5,7)."),
          set_: List[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every point."),
          output: Optional[Path] = typer.Option(None, "--output", help="The sweep directory (default "
                                                "runs/<name>-sweep); a rerun skips finished points."),
          jobs: int = typer.Option(1, "--jobs", help="Runs at a time, each with cores/jobs torch threads."),
          interval: str = typer.Option("t", "--interval", help="t (Student's t, default) or bootstrap."),
          metric: Optional[str] = typer.Option(None, "--metric", help="What `best` means (default: the task's "
                                                                      "primary metric)."),
          row: Optional[str] = typer.Option(None, "--row", help="The result row compared (default: distilled)."),
          seed_field: List[str] = typer.Option(["train.seed"], "--seed-field", help="The recipe field(s) the "
                                               "seed goes into (repeatable).")):
    """Run a grid of recipe settings over seeds; a table of means with 95% intervals, the best point, plots."""
    from distill.core.sweep import Sweep

    planned = Sweep(recipe, grid, seeds, overrides=set_, output=output, seed_fields=seed_field, jobs=jobs,
                    interval=interval, metric=metric, row=row)
    planned.plan()  # every point validated, every existing directory checked: nothing written yet
    result = planned.run(progress=lambda line: console.print(line, markup=False, highlight=False))
    from distill.core.sweep import summary_notes, summary_rows

    header, body = summary_rows(result, limit=4)  # the target and 3 more metrics; sweep.md has all
    table = Table(title=f"distill sweep: {result.directory} (all metrics: sweep.md)")
    for column in header:
        table.add_column(column, justify="right")
    for cells in body:
        table.add_row(*[c.replace("**", "") for c in cells])
    console.print(table)
    for line in summary_notes(result):
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {result.directory / 'sweep.html'}")
    if result.failed:
        sys.exit(1)


@app.command()
def demo(seed: int = typer.Option(0, help="Seed of the student init, data order and data."),
         output: Optional[str] = typer.Option(None, help="Run directory (default runs/demo-seed<seed>)."),
         set_: List[str] = typer.Option([], "--set", help=SET_HELP),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo run.")):
    """The built-in oracle task end to end: teacher vs student alone vs distilled student."""
    overrides = [f"train.seed={seed}", f"data.seed={seed}", f"output={output or f'runs/demo-seed{seed}'}", *set_]
    _run("builtin:oracle-demo", overrides, False, overwrite)


@app.command()
def cache(recipe: Optional[str] = typer.Argument(None, help="Recipe YAML whose teacher and data to cache."),
          out: Optional[str] = typer.Option(None, "--out", help="Cache directory (default: the recipe's regime.path)."),
          k: Optional[int] = typer.Option(None, "--k", help="Top-k entries per token (default: regime.k, 64)."),
          ids: Optional[str] = typer.Option(None, "--ids", help="Id coding: rice (default) or packed."),
          values: Optional[str] = typer.Option(None, "--values", help="Log-prob storage: int8 (default) or float16."),
          set_: List[str] = typer.Option([], "--set", help=SET_HELP),
          verify: Optional[Path] = typer.Option(None, "--verify", help="Check every shard of the cache in DIR "
                                                                       "against its checksum, and stop.")):
    """Run the teacher once over the recipe's data and store its top-k per token (resumable)."""
    if verify is not None:
        from distill.lm.teacher.cache.store import read_manifest, verify_cache

        manifest = read_manifest(verify, field="--verify")
        problems = verify_cache(verify)
        for problem in problems:
            errors.print(f"[red]bad[/red] {escape(problem)}", highlight=False)
        if problems:
            raise DistillError(f"{len(problems)} of {len(manifest['shards'])} shards in `{verify}` failed the check",
                               field="--verify", fix="rebuild the cache into a new directory with `distill cache`")
        console.print(f"ok: {len(manifest['shards'])} shards, {manifest['num_tokens']:,} tokens, "
                      f"{manifest['bytes_per_token']:.1f} bytes/token, every checksum matches")
        return
    if recipe is None:
        raise DistillError("give a recipe to build a cache from, or --verify DIR", field="RECIPE",
                           fix="distill cache recipe.yaml  (or: distill cache --verify DIR)")
    from distill.core.recipe import load_recipe

    checked = load_recipe(recipe, set_)
    if checked.task != "lm":
        raise DistillError(f"a teacher cache holds a causal LM's top-k tokens; this recipe is task {checked.task}",
                           field="task", fix="give a task: lm recipe")
    if k is not None and k < 1:
        raise DistillError(f"--k must be at least 1, got {k}", field="--k", fix="e.g. --k 64 (or leave it out: "
                                                                           "the recipe's regime.k)")
    for name, value, allowed in (("--ids", ids, ("rice", "packed")), ("--values", values, ("int8", "float16"))):
        if value is not None and value not in allowed:
            raise DistillError(f"{name} must be one of {', '.join(allowed)}, got `{value}`", field=name,
                               fix=f"{name} {allowed[0]}")
    from distill.lm.teacher.cache.build import build_cache

    build_cache(checked, out=out, k=k, ids=ids, values=values)


@app.command()
def rollouts(recipe: str = typer.Argument(..., help="An opd recipe (regime.rollouts: where the samples go)."),
             out: Optional[str] = typer.Option(None, "--out", help="Rollouts directory (default: the recipe's "
                                                                   "regime.rollouts)."),
             student: Optional[str] = typer.Option(None, "--student", help="Sample this saved model instead of the "
                                                   "recipe's initial student (e.g. RUN/student: the current one)."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Sample the student's completions of the training prompts once, for offline OPD (resumable)."""
    from distill.core.recipe import load_recipe

    checked = load_recipe(recipe, set_)
    if checked.task != "lm":
        raise DistillError(f"rollouts are a causal LM's samples; this recipe is task {checked.task}", field="task",
                           fix="give a task: lm recipe with regime.kind: opd")
    from distill.lm.rollouts import build_rollouts, read_manifest

    directory = build_rollouts(checked, out=out, student=student)
    manifest = read_manifest(directory)
    console.print(f"rollouts: {manifest['identity']['examples']} samples of "
                  f"`{escape(manifest['identity']['student']['path'])}` in {escape(str(directory))}; next: "
                  "distill cache RECIPE (the teacher's scores), then distill run RECIPE", highlight=False)


@app.command("select")
def select_command(recipe: str = typer.Argument(..., help="A causal-LM recipe: its teacher and training data."),
                   reference: str = typer.Option(..., "--reference", help="The reference model: a small LM trained "
                                                 "on the same data (difference), or the student (divergence)."),
                   out: Path = typer.Option(..., "--out", help="Directory for the selected dataset."),
                   method: str = typer.Option("difference", "--method", help="difference (MiniPLM) or divergence "
                                              "(KL(teacher || reference) per token)."),
                   keep: Optional[float] = typer.Option(None, "--keep", help="Write the top fraction of rows by score "
                                                        "(default 0.5)."),
                   temperature: Optional[float] = typer.Option(None, "--temperature", help="Instead: write every "
                                                               "row with weight n * softmax(score / T)."),
                   set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                   batch_size: int = typer.Option(32, "--batch-size"),
                   overwrite: bool = typer.Option(False, "--overwrite", help="Replace a selection in --out.")):
    """Score the training rows with the teacher and a reference model; write the rows worth training on
    (or all of them, weighted): train with data.train: OUT (and data.weights: weight)."""
    from distill.lm.select import select, selection_summary

    manifest = select(recipe, reference, out, method=method, keep=keep, temperature=temperature,
                      overwrite=overwrite, batch_size=batch_size, overrides=tuple(set_))
    console.print(selection_summary(manifest), markup=False, highlight=False)
    console.print(f"written: {out} (data: {{train: {out}" + (", weights: weight" if temperature else "") + "})",
                  markup=False, highlight=False)


@app.command()
def serve(teacher: str = typer.Argument(..., help="A saved causal LM directory, hub id, or builtin:<task>-teacher."),
          host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; another than loopback needs "
                                                               "--api-key-env."),
          port: int = typer.Option(8000, "--port"),
          dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
          max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens", help="Padded tokens per scoring batch "
                                                                                  "(concurrent requests share one)."),
          max_logprobs: int = typer.Option(64, "--max-logprobs", help="The largest prompt_logprobs a request may ask."),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the "
                                                    "API key clients must send (Authorization: Bearer KEY)."),
          name: Optional[str] = typer.Option(None, "--name", help="The model name clients use (default: TEACHER)."),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch.set_num_threads for the teacher "
                                                "(default: torch's choice).")):
    """Serve a teacher over the OpenAI-compatible API subset vLLM implements for scoring (completions with
    prompt_logprobs and sampling, /tokenize, /v1/models)."""
    from distill.lm.teacher.serve import LOOPBACK, TeacherEngine, build_app

    if dtype not in ("float32", "bfloat16", "float16"):
        raise DistillError(f"unknown dtype `{dtype}`", field="--dtype", fix="use float32, bfloat16 or float16")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise DistillError(f"the environment variable {api_key_env} is not set", field="--api-key-env",
                               fix=f"export {api_key_env}=<a secret key> before starting the server")
    elif host not in LOOPBACK:
        raise DistillError(f"binding to {host} exposes the teacher beyond this machine without a key",
                           field="--api-key-env", fix="set --api-key-env VAR (clients send that key), or bind "
                                                      "--host 127.0.0.1")
    try:
        import uvicorn
    except ImportError:
        raise DistillError("serving needs fastapi and uvicorn", field="serve",
                           fix='pip install "distill[serve]"') from None
    from distill.lm.models import DTYPES, load_causal_lm, load_tokenizer, quiet_transformers

    quiet_transformers()
    if threads:
        import torch

        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(teacher, "TEACHER")
    model = load_causal_lm(teacher, "TEACHER", DTYPES[dtype])
    engine = TeacherEngine(model, tokenizer, name=name or teacher, max_batch_tokens=max_batch_tokens,
                           max_logprobs=max_logprobs)
    console.print(f"serving {engine.name} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(build_app(engine, api_key), host=host, port=port, log_level="warning")


@app.command("train-teacher")
def train_teacher_command(task: str = typer.Argument(..., help="builtin:oracle, arithmetic, digits or mnist5k"),
                          out: str = typer.Option(..., "--out", help="Directory for the trained teacher."),
                          steps: Optional[int] = typer.Option(None, help="Updates (default: oracle and arithmetic "
                                                              "3000, gmm2d 4000, digits --diffusion 6000)."),
                          epochs: float = typer.Option(15, help="Image tasks (digits, mnist5k): CNN epochs."),
                          diffusion: bool = typer.Option(False, "--diffusion", help="Same as --family diffusion "
                                                         "(builtin:digits: the denoiser, not the classifier)."),
                          family_name: Optional[str] = typer.Option(None, "--family", help="The family whose teacher "
                                                                    "to train, when several have the task (digits)."),
                          batch_size: int = typer.Option(32, "--batch-size"),
                          lr: float = typer.Option(2e-3), train_size: int = typer.Option(50000, "--train-size"),
                          seed: int = typer.Option(0), threads: Optional[int] = typer.Option(None),
                          overwrite: bool = typer.Option(False, "--overwrite"),
                          resume: bool = typer.Option(False, "--resume"),
                          config: Optional[str] = typer.Option(None, "--config", help="builtin:oracle and "
                                                               "arithmetic: the teacher's size, as YAML, e.g. "
                                                               "'{hidden_size: 64, num_hidden_layers: 2}' (the rest as "
                                                               "the shipped teacher)."),
                          tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="builtin:oracle: `bpe` "
                                                                  "trains on the oracle's byte-level BPE instead of one "
                                                                  "token per symbol (the two-tokenizer oracle's other "
                                                                  "direction).")):
    """Train a built-in task's teacher with the same trainer as its family (plain cross-entropy)."""
    from distill.core.families import family_names, get_family

    name = task.removeprefix("builtin:")
    families = [get_family(f) for f in family_names()]
    owners = [f for f in families if name in f.teacher_tasks]
    family_name = "diffusion" if diffusion else family_name
    if family_name is not None:  # builtin:digits has a classifier teacher and a diffusion teacher
        owners = [f for f in owners if f.task == family_name]
    # Without --family, the first family registered that has the task (digits: the classifier).
    if family_name is not None and not owners and any(name in f.teacher_tasks for f in families):
        having = ", ".join(f.task for f in families if name in f.teacher_tasks)
        raise DistillError(f"family `{family_name}` has no teacher for {name}", field="--family",
                           fix=f"use --family {having.split(', ')[0]} ({name} has teachers in: {having})")
    if not task.startswith("builtin:") or not owners:
        known = ", ".join(dict.fromkeys(f"builtin:{t}" for f in families for t in f.teacher_tasks))
        raise DistillError(f"`{task}` is not a built-in task with a teacher", field="TASK", fix=f"use one of: {known}")
    family = owners[0]
    for option, value, low in (("--steps", steps, 1), ("--epochs", epochs, 0), ("--batch-size", batch_size, 1),
                               ("--lr", lr, 0), ("--train-size", train_size, 1), ("--threads", threads, 1)):
        if value is not None and not (math.isfinite(value) and (value >= low if low else value > 0)):
            raise DistillError(f"{option} must be {'at least 1' if low else 'a finite number above 0'}, got {value}",
                               field=option, fix=f"e.g. {option} {4 if low else 1e-3 if option == '--lr' else 1}")
    from distill.core.io import writable_problem

    if (problem := writable_problem(out)) is not None:
        raise DistillError(f"`{out}` cannot be written: {problem}", field="--out", fix="choose a writable --out")
    model_overrides = None
    if config is not None:
        import yaml

        try:
            model_overrides = yaml.safe_load(config)
        except yaml.YAMLError as error:
            raise DistillError(f"--config is not YAML: {str(error).splitlines()[0]}", field="--config",
                               fix="write e.g. --config '{hidden_size: 64, num_hidden_layers: 2}'") from None
        if not isinstance(model_overrides, dict) or not model_overrides:
            raise DistillError(f"--config {config!r} is not a mapping of model sizes", field="--config",
                               fix="write e.g. --config '{hidden_size: 64, num_hidden_layers: 2}'")
        if "model_overrides" not in family.teacher_options:
            raise DistillError(f"--config applies to the causal-LM teachers, not {task}", field="--config",
                               fix="drop --config")
    given = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, train_size=train_size, seed=seed,
                 threads=threads, overwrite=overwrite, resume=resume, tokenizer=tokenizer,
                 model_overrides=model_overrides)
    if tokenizer is not None and "tokenizer" not in family.teacher_options:
        raise DistillError(f"--tokenizer applies to builtin:oracle, not {task}", field="--tokenizer",
                           fix="drop --tokenizer")
    options = {key: given[key] for key in family.teacher_options if given[key] is not None}
    metrics = family.train_teacher(name, out, **options)
    if metrics:
        console.print_json(json.dumps(metrics))


@app.command()
def losses():
    """Every registered loss, one table per kind titled with the recipe field that names it: name (aliases),
    formula, parameters with their allowed ranges, paper."""
    from distill.losses import KINDS, specs

    where = {  # kind -> the recipe field that names a loss of that kind
        "token": "task lm: objective.loss (extra objective keys are its parameters)",
        "classifier": "task classifier: objective.terms[].loss, logit terms (extra term keys are the parameters)",
        "feature": "task classifier: objective.terms[].loss, feature terms (with student_layer, teacher_layer, "
                   "projector)",
        "diffusion": "task diffusion: student.method (dmd | consistency | progressive) trains with these",
        "f_divergence": "task diffusion: objective.divergence (the f-divergence weighting DMD's gradient)",
        "cross_token": "task lm: objective.loss, for a teacher and student with different tokenizers (over "
                       "aligned positions or chunks)",
        "preference": "task lm: objective.loss with regime.kind preference, over pairs of completions (chosen, "
                      "rejected; extra objective keys are its parameters; adpa on the student's samples)",
    }
    for kind in KINDS:
        table = Table(title=f"{kind} losses - {where.get(kind, 'no recipe field')}")
        table.add_column("name", no_wrap=True)  # names are what a recipe writes: never folded
        for column in ("formula", "parameters", "notes", "paper"):
            table.add_column(column, overflow="fold")
        for spec in sorted(specs(kind), key=lambda spec: not spec.is_objective):  # the objectives, then pieces
            notes = [note for note, applies in (
                ("not an objective itself: a piece of one", not spec.is_objective),
                ("couples tokens: no fused path", not spec.token_separable),
                (f"schedule: {spec.schedule}", spec.schedule),
                ("needs labels", spec.needs_labels), ("no teacher", not spec.needs_teacher),
                ("teacher's class means", spec.needs_class_means), ("equal shapes", spec.equal_shapes),
                (f"batch >= {spec.min_examples}", spec.min_examples > 1)) if applies]
            aliases = f" ({', '.join(spec.aliases)})" if spec.aliases else ""
            table.add_row(escape(spec.name + aliases), escape(spec.formula), escape(spec.describe_params()),
                          escape("; ".join(notes) or "-"), escape(spec.paper))
        console.print(table)


@app.command()
def layers(model: str = typer.Argument(..., help="A saved classifier directory, builtin:<task>-teacher, or a "
                                                 "transformers model directory.")):
    """The module names a classifier recipe can hook (objective.terms[].student_layer / teacher_layer)."""
    from distill.core.hooks import module_names

    if model.startswith("builtin:") or (Path(model) / "classifier.json").is_file():
        from distill.classifier.models import load_classifier

        loaded, _ = load_classifier(model, "MODEL")
    else:
        from transformers import AutoModel

        from distill.lm.models import resolve_model_path

        loaded = AutoModel.from_pretrained(resolve_model_path(model, "MODEL"))
        console.print("transformers outputs: hidden_states.N, attentions.N (N = layer index, -1 = last)")
    table = Table(title=f"modules of {model} (`name` hooks the output, `name:input` the input)")
    table.add_column("name")
    table.add_column("type")
    for name, kind in module_names(loaded):
        table.add_row(name, kind)
    console.print(table)


@app.command()
def report(run_dirs: List[Path] = typer.Argument(..., help="Finished run directories.")):
    """Print the result table of finished runs."""
    from distill.core.rundir import RunResult

    for run_dir in run_dirs:
        _print_result(RunResult.load(run_dir))


@app.command("eval")
def eval_command(target: Path = typer.Argument(..., help="A finished run directory, or a saved model directory "
                                                         "(e.g. a run's student/)."),
                 data: Optional[str] = typer.Option(None, "--data", help="A saved model: builtin:<task> or a data "
                                                                         "file to score it on."),
                 recipe: Optional[str] = typer.Option(None, "--recipe", help="Score on this recipe's data, with "
                                                                             "its teacher."),
                 set_: List[str] = typer.Option([], "--set", help=SET_HELP + " Applies to the recipe used."),
                 output: Optional[Path] = typer.Option(None, "--output", help="Also write the rows as JSON here."),
                 lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Score causal LMs on "
                                                       "lm-evaluation-harness tasks instead (comma-separated names)."),
                 lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="A directory of "
                                                                "your own lm-eval YAML tasks."),
                 lm_eval_limit: Optional[float] = typer.Option(None, "--lm-eval-limit", help="At most this many "
                                                               "documents per task (a fraction if below 1).")):
    """Re-evaluate a finished run's models, or any saved model, and print the same rows a run reports (with
    --lm-eval: scored on lm-evaluation-harness tasks instead)."""
    if lm_eval is None:
        if lm_eval_include is not None or lm_eval_limit is not None:
            raise DistillError("--lm-eval-include and --lm-eval-limit go with --lm-eval", field="--lm-eval",
                               fix="add --lm-eval TASKS, or drop them")
        from distill.core.evaluation import evaluate

        result = evaluate(target, data=data, recipe=recipe, overrides=set_, output=output)
    else:
        if data is not None or recipe is not None or set_:
            raise DistillError("--data, --recipe and --set choose the data of distill's own evaluation; with "
                               "--lm-eval the tasks are the data", field="--lm-eval",
                               fix="drop them, or run the two evaluations separately")
        from distill.lm.harness import evaluate_harness

        result = evaluate_harness(target, lm_eval, include_path=lm_eval_include, limit=lm_eval_limit, output=output)
    _print_result(result, title=f"distill eval: {target}")
    if output is not None:
        console.print(f"rows: {output}")


@app.command()
def compare(runs: List[Path] = typer.Argument(..., help="Two or more finished run directories."),
            output: Optional[Path] = typer.Option(None, "--output", help="Write compare.md, compare.html and "
                                                                         "plots/ into this directory.")):
    """Finished runs side by side: every shared metric (best per column marked), eval curves overlaid."""
    from distill.core.evaluation import compare as compare_runs

    console.print(compare_runs(runs, output=output), markup=False, highlight=False)
    if output is not None:
        console.print(f"written: {output / 'compare.md'}, {output / 'compare.html'}")


def _leave_process_group() -> None:
    """Under `accelerate launch` / torchrun, after a command that finished: take down the collective
    backend and end the process without C++ static destructors. On a loaded machine a finished
    two-process run sometimes aborted at interpreter exit ("terminate called without an active
    exception", SIGABRT: a native thread destroyed while joinable), even after destroy_process_group;
    everything the run writes is already written and fsynced by then."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


DEBUG_ENV = "DISTILL_DEBUG"  # set, or `distill --debug`: a failure prints its traceback too
_debug: list[bool] = [False]


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="On an unexpected failure, print the traceback "
                                                                "(it is always written to a log file).")):
    """Distill a large teacher model into a small, fast student."""
    _debug[0] = debug


def _report_failure(error: BaseException) -> int:
    """One clear line (what failed, where the traceback is, how to continue) for an exception that is not a
    DistillError (core.failures); the exit code."""
    from distill.core.failures import describe_failure

    debug = _debug[0] or bool(os.environ.get(DEBUG_ENV))
    lines, text = describe_failure(error, debug=debug)
    if debug:
        errors.print(escape(text), highlight=False, soft_wrap=True)
    errors.print("[bold red]error[/bold red] " + escape("\n  ".join(lines)), highlight=False, soft_wrap=True)
    return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM: ends the command like an interrupt (trackers close, the message says what is kept)."""


def _on_sigterm(signum, frame) -> None:
    """A launcher (torchrun / accelerate launch) stops the other processes of a run when one fails."""
    raise Terminated


def main() -> None:
    from distill.core.errors import note_output_directory

    note_output_directory(None)
    _debug[0] = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main() -> None:
    try:
        app(standalone_mode=False)
        _leave_process_group()
    except DistillError as error:
        errors.print(f"[bold red]error[/bold red] {escape(error.render())}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        if isinstance(interrupt, Terminated) and rank is not None:
            errors.print(f"rank {rank}: stopped by its launcher (SIGTERM), as happens when another process of this "
                         "run failed; what was checkpointed is kept: launch the same command again with --resume")
            sys.exit(143)
        errors.print("interrupted; what was checkpointed is kept: continue with `distill run RECIPE --resume`")
        sys.exit(130)
    except Exception as error:  # click's usage errors (typer ships its own click) come here in non-standalone mode
        if type(error).__name__ == "NoArgsIsHelpError":  # bare `distill`: the help, already printed, is the answer
            sys.exit(0)
        show, exit_code = getattr(error, "show", None), getattr(error, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        if type(error).__name__ == "Abort":
            sys.exit(130)
        sys.exit(_report_failure(error))


if __name__ == "__main__":
    main()
