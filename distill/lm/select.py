"""`distill select`: teacher-guided data selection. Score every training row with the teacher and a
reference model, then write the rows worth training on, or every row with a weight.

    difference   MiniPLM's difference sampling (Gu et al. 2025, "MiniPLM: Knowledge Distillation for
                 Pre-Training Language Models"): score(x) = (1/|x|) sum_t [log p_T(x_t | x_<t) - log p_R(x_t | x_<t)]
                 over the row's loss tokens, with R a small reference LM trained on the same corpus. High:
                 what the teacher finds likely beyond what a small model picks up by itself (rows the
                 reference over-rates, noise and easy boilerplate, score low).
    divergence   score(x) = (1/|x|) sum_t KL(p_T(. | x_<t) || p_R(. | x_<t)), R the student (its init or an
                 earlier run's): the rows where the student disagrees most with the teacher, as used to
                 pick reasoning traces for distillation.

Output (`--out DIR`): a Hugging Face dataset (`save_to_disk`) of the rows with `score` and `weight`
columns, and `selection.json` (method, models, counts). `--keep F` writes the top fraction F of rows by
score (weight 1); `--temperature T` writes every row with weight n * softmax(score / T) (mean 1), for
`data.weights: weight`. Train on it with `data: {train: DIR}` (plus `builtin: <task>` to keep a
built-in task's evaluation).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.core.errors import DistillError
from distill.core.io import atomic_write_json, staged_directory, writable_problem

METHODS = ("difference", "divergence")
MANIFEST = "selection.json"


def check_options(method: str, keep: float | None, temperature: float | None, out: Path, overwrite: bool) -> None:
    if method not in METHODS:
        raise DistillError(f"unknown method `{method}`", field="--method", fix=f"use {' or '.join(METHODS)}")
    if keep is not None and temperature is not None:
        raise DistillError("--keep filters and --temperature weights: give one", field="--keep",
                           fix="drop one of them")
    if keep is not None and not (0 < keep <= 1):
        raise DistillError(f"--keep {keep} is a fraction of the rows", field="--keep", fix="give 0 < F <= 1, e.g. 0.5")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise DistillError(f"--temperature {temperature} must be above 0", field="--temperature", fix="e.g. 1.0")
    if out.exists() and any(out.iterdir() if out.is_dir() else [out]) and not overwrite:
        raise DistillError(f"`{out}` is not empty", field="--out",
                           fix="choose a new directory, or pass --overwrite to replace a selection there")
    if out.exists() and overwrite and not (out / MANIFEST).is_file():
        raise DistillError(f"`{out}` holds no selection ({MANIFEST}); refusing to replace it", field="--out",
                           fix="choose a new directory")
    if (problem := writable_problem(out)) is not None:
        raise DistillError(f"`{out}` cannot be written: {problem}", field="--out", fix="choose a writable --out")


def row_scores(teacher, reference, examples, pad_token_id: int, method: str, batch_size: int = 32) -> list[float]:
    """Per row: the mean over its loss tokens of the teacher-minus-reference log-prob of the next token
    (difference) or of KL(teacher || reference) (divergence)."""
    from tqdm.auto import tqdm

    from distill.lm.data import IGNORE_INDEX, collate, model_inputs

    scores: list[float] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc=f"select ({method})", unit="batch",
                          mininterval=2.0):
            batch = collate(examples[start:start + batch_size], pad_token_id)
            inputs = model_inputs(batch)
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            teacher_logp = F.log_softmax(teacher(**inputs, use_cache=False).logits[:, :-1].float(), dim=-1)
            reference_logp = F.log_softmax(reference(**inputs, use_cache=False).logits[:, :-1].float(), dim=-1)
            if method == "difference":
                index = labels.clamp(min=0).unsqueeze(-1)
                per_token = (teacher_logp.gather(-1, index) - reference_logp.gather(-1, index)).squeeze(-1)
            else:
                per_token = (teacher_logp.exp() * (teacher_logp - reference_logp)).sum(-1)
            totals = (per_token * mask).sum(-1)
            counts = mask.sum(-1)
            for total, count in zip(totals.tolist(), counts.tolist()):
                scores.append(total / count if count else float("nan"))
    return scores


def weights_from_scores(scores: list[float], keep: float | None, temperature: float | None) -> list[float]:
    """1 for the top `keep` fraction (0 for the rest), or n * softmax(score / temperature)."""
    n = len(scores)
    finite = [s if math.isfinite(s) else -math.inf for s in scores]
    if temperature is not None:
        top = max(finite)
        exps = [math.exp((s - top) / temperature) if math.isfinite(s) else 0.0 for s in finite]
        total = sum(exps)
        return [n * e / total for e in exps]
    count = max(1, math.ceil(keep * n - 1e-9))
    ranked = sorted(range(n), key=lambda i: finite[i], reverse=True)[:count]
    chosen = set(ranked)
    return [1.0 if i in chosen else 0.0 for i in range(n)]


def select(recipe, reference: str, out: str | Path, *, method: str = "difference", keep: float | None = None,
           temperature: float | None = None, overwrite: bool = False, batch_size: int = 32,
           overrides: tuple[str, ...] = ()) -> dict:
    """Score the recipe's training rows with its teacher and `reference`; write the selection to `out`.
    Returns the manifest."""
    from distill.core.recipe import load_recipe
    from distill.lm.data import load_data
    from distill.lm.models import load_causal_lm, load_tokenizer, quiet_transformers, resolve_model_path
    from distill.lm.tasks import get_task

    out = Path(out).expanduser()
    keep = 0.5 if keep is None and temperature is None else keep
    check_options(method, keep, temperature, out, overwrite)
    recipe = load_recipe(recipe, overrides)
    if recipe.task != "lm":
        raise DistillError(f"`distill select` scores a causal LM's training rows; this recipe is `task: "
                           f"{recipe.task}`", field="task", fix="give a causal-LM recipe (task: lm)")
    if recipe.teacher.path is None:
        raise DistillError("selection reads the teacher's whole next-token distributions: a served teacher is "
                           "not supported", field="teacher.path", fix="give teacher.path (a local copy)")
    if recipe.data.packing:
        raise DistillError("selection scores whole rows", field="data.packing", fix="set data.packing false")
    if recipe.objective.cross_tokenizer:
        raise DistillError("teacher and reference must share one tokenizer", field="objective.cross_tokenizer",
                           fix="select with a same-tokenizer recipe")
    quiet_transformers()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    tokenizer = load_tokenizer(recipe.teacher.path, "teacher.path", recipe.teacher.trust_remote_code)
    task = get_task(recipe.data.builtin) if recipe.data.builtin else None
    records, _, examples, _ = load_data(recipe.data, tokenizer, task)
    teacher = load_causal_lm(recipe.teacher.path, "teacher.path").eval()
    reference_model = load_causal_lm(reference, "--reference").eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if reference_model.get_output_embeddings().weight.shape[0] != vocab:
        raise DistillError(f"the reference's vocabulary ({reference_model.get_output_embeddings().weight.shape[0]} "
                           f"tokens) is not the teacher's ({vocab})", field="--reference",
                           fix="give a reference on the teacher's tokenizer (e.g. a distill run's alone/ or student/)")
    scores = row_scores(teacher, reference_model, examples, tokenizer.pad_token_id or 0, method, batch_size)
    weights = weights_from_scores(scores, keep, temperature)
    rows = [{**(record if isinstance(record, dict) else {"text": record}), "score": score, "weight": weight}
            for record, score, weight in zip(records, scores, weights)]
    written = [row for row in rows if row["weight"] > 0] if keep is not None else rows
    manifest = {"method": method, "keep": keep, "temperature": temperature,
                "teacher": resolve_model_path(recipe.teacher.path, "teacher.path"),
                "reference": resolve_model_path(reference, "--reference"), "rows": len(rows), "written": len(written),
                "score_mean": sum(s for s in scores if math.isfinite(s)) / max(1, sum(map(math.isfinite, scores))),
                "data": recipe.data.model_dump(mode="json")}
    import datasets

    with staged_directory(out) as staging:
        datasets.Dataset.from_list(written).save_to_disk(str(staging))
        atomic_write_json(staging / MANIFEST, manifest)
    return manifest


def selection_summary(manifest: dict) -> str:
    kept = (f"kept the top {manifest['keep']:.0%}: {manifest['written']} of {manifest['rows']} rows"
            if manifest["keep"] is not None else
            f"weighted all {manifest['rows']} rows (temperature {manifest['temperature']})")
    return f"{manifest['method']} selection: {kept}; mean score {manifest['score_mean']:.4f}"
