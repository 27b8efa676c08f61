"""The `distill` command line: demo, run, cache, train-teacher, losses, report.

Every user-fixable problem is a `DistillError`: printed as `field: message` + `fix:`, exit code 2,
no traceback.
"""
from __future__ import annotations

import json
import sys
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


def _print_result(result) -> None:
    from distill.core.report import best_line, footnote, table_rows, verdict_line

    if result.extras.get("recipe", {}).get("task") == "diffusion":
        from distill.diffusion.run import _table

        header, body = _table(result.rows)
    else:
        header, body = table_rows(result.rows, result.primary_metric)
    table = Table(title=f"distill: {result.run_dir}")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    verdict = verdict_line(result.rows, result.primary_metric, result.higher_is_better)
    for line in (verdict, best_line(result.extras.get("best_eval", {})), footnote(result.rows)):
        if line:
            console.print(line)
    console.print(f"report: {result.run_dir / 'report.html'}")


def _run(recipe: str, overrides: list[str], resume: bool, overwrite: bool) -> None:
    from distill.lm.recipe import load_recipe

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
    from distill.lm.recipe import load_recipe

    checked = load_recipe(recipe, set_)
    for name, value, allowed in (("--ids", ids, ("rice", "packed")), ("--values", values, ("int8", "float16"))):
        if value is not None and value not in allowed:
            raise DistillError(f"{name} must be one of {', '.join(allowed)}, got `{value}`", field=name,
                               fix=f"{name} {allowed[0]}")
    from distill.lm.teacher.cache.build import build_cache

    build_cache(checked, out=out, k=k, ids=ids, values=values)


@app.command("train-teacher")
def train_teacher_command(task: str = typer.Argument(..., help="builtin:oracle, arithmetic, digits or mnist5k"),
                          out: str = typer.Option(..., "--out", help="Directory for the trained teacher."),
                          steps: Optional[int] = typer.Option(None, help="Updates (default: oracle and arithmetic "
                                                              "3000, gmm2d 4000, digits --diffusion 6000)."),
                          epochs: float = typer.Option(15, help="Image tasks (digits, mnist5k): CNN epochs."),
                          diffusion: bool = typer.Option(False, "--diffusion", help="builtin:digits: train the "
                                                         "diffusion teacher (a denoiser), not the classifier."),
                          batch_size: int = typer.Option(32, "--batch-size"),
                          lr: float = typer.Option(2e-3), train_size: int = typer.Option(50000, "--train-size"),
                          seed: int = typer.Option(0), threads: Optional[int] = typer.Option(None),
                          overwrite: bool = typer.Option(False, "--overwrite"),
                          resume: bool = typer.Option(False, "--resume")):
    """Train a built-in task's teacher with the same trainer (plain cross-entropy)."""
    if not task.startswith("builtin:"):
        raise DistillError(f"`{task}` is not a built-in task", field="TASK",
                           fix="use builtin:oracle, arithmetic, digits, mnist5k or gmm2d")
    from distill.classifier.data import IMAGE_TASKS

    name = task.removeprefix("builtin:")
    if name == "gmm2d" or (diffusion and name == "digits"):  # an EDM denoiser, --steps updates
        from distill.diffusion.train_teacher import train_diffusion_teacher

        console.print_json(json.dumps(train_diffusion_teacher(name, out, steps=steps, seed=seed, threads=threads or 1,
                                                              overwrite=overwrite)))
        return
    if name in IMAGE_TASKS:  # a CNN trained on labels for --epochs
        from distill.classifier.train_teacher import train_image_teacher

        metrics = train_image_teacher(task.removeprefix("builtin:"), out, epochs=epochs, seed=seed,
                                      threads=threads or 1, overwrite=overwrite)
        console.print_json(json.dumps(metrics))
        return
    from distill.lm.train_teacher import train_teacher

    metrics = train_teacher(task, out, **({"steps": steps} if steps else {}), batch_size=batch_size, lr=lr,
                            train_size=train_size, seed=seed, threads=threads, overwrite=overwrite, resume=resume)
    if metrics:
        console.print_json(json.dumps(metrics))


@app.command()
def losses():
    """Every objective with its formula, parameters and paper."""
    from distill.losses import FORMULAS, PAPERS, REGISTRY, loss_parameters

    table = Table(title="distill objectives: fn(student_logits, teacher_logits, mask, temperature=1.0, **params)")
    for column in ("name", "formula", "parameters", "paper"):
        table.add_column(column, overflow="fold")
    for name in REGISTRY:
        params = ", ".join(f"{k}={v}" for k, v in loss_parameters(name).items()) or "-"
        table.add_row(name, FORMULAS[name], params, PAPERS[name])
    console.print(table)
    from distill.losses.classic import CLASSIC_FORMULAS, CLASSIC_PAPERS, CLASSIC_REGISTRY, classic_parameters
    from distill.losses.features import FEATURE_FORMULAS, FEATURE_PAPERS

    table = Table(title="task: classifier objective terms (objective.terms: [{loss: NAME, weight, ...params}])")
    for column in ("name", "formula", "parameters", "paper"):
        table.add_column(column, overflow="fold")
    table.add_row("ce", "cross-entropy with the labels", "-", "-")
    for name in CLASSIC_REGISTRY:
        params = ", ".join(f"{k}={v}" for k, v in classic_parameters(name).items()) or "-"
        table.add_row(name, CLASSIC_FORMULAS[name], params, CLASSIC_PAPERS[name])
    table.add_row("bdkd", "T^2 (a_i KL(p_T||p_S) + b_i KL(p_S||p_T)), (a, b) = (1, gamma) if H(p_S) > H(p_T) "
                  "else (gamma, 1)", "temperature=1.0, gamma=2.0", "Amara et al. 2022, BD-KD")
    for name, formula in FEATURE_FORMULAS.items():
        table.add_row(name, formula, "student_layer, teacher_layer, projector=auto", FEATURE_PAPERS[name])
    console.print(table)
    from distill.losses.diffusion import DIFFUSION_FORMULAS, DIFFUSION_PAPERS, FDIVERGENCE_WEIGHTS

    table = Table(title="task: diffusion objectives (student.method: dmd | consistency | progressive; "
                        "objective.divergence weighs DMD)")
    for column in ("name", "formula", "paper"):
        table.add_column(column, overflow="fold")
    for name, formula in DIFFUSION_FORMULAS.items():
        table.add_row(name, formula, DIFFUSION_PAPERS[name])
    for name, weight in FDIVERGENCE_WEIGHTS.items():
        table.add_row(f"divergence: {name}", weight, DIFFUSION_PAPERS["f_divergence_weight"])
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
    from distill.core.rundir import FINISHED_MARKER, RunResult

    for run_dir in run_dirs:
        if not (run_dir / FINISHED_MARKER).is_file():
            raise DistillError(f"`{run_dir}` holds no finished run (no {FINISHED_MARKER})", field="RUN_DIRS",
                               fix="give the output directory of a run that completed")
        _print_result(RunResult.load(run_dir))


def main() -> None:
    try:
        app(standalone_mode=False)
    except DistillError as error:
        errors.print(f"[bold red]error[/bold red] {escape(error.render())}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted; continue with `distill run RECIPE --resume`")
        sys.exit(130)
    except Exception as error:  # click usage errors come through here in non-standalone mode
        import click
        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(2)
        if isinstance(error, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
