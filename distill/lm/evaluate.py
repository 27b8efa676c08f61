"""Metrics for a causal LM on the eval data: NLL, agreement with the teacher, the task's exact
metric, size, and generation throughput measured on this machine."""
from __future__ import annotations

import torch

from distill.lm.data import IGNORE_INDEX, Example, collate
from distill.losses.logits import forward_kl
from distill.losses.sparse import student_topk_tail_logits, teacher_topk_tail_logits
from distill.core.metrics import count_parameters, median_seconds, teacher_agreement_sums


@torch.no_grad()
def token_metrics(model, examples: list[Example], *, vocab_size: int, batch_size: int, pad_token_id: int,
                  teacher=None, teacher_cache=None, per_token: dict | None = None) -> dict[str, float]:
    """Per completion token: NLL of the data, and with a teacher the top-1 agreement and
    KL(teacher || model), all averaged over every valid token of the eval set.

    `teacher_cache` = (TeacherCache, spans of `examples`) stands in for the teacher: agreement
    with its top-1, and the KL over its top-k + tail buckets (a lower bound of the full KL).
    `per_token`, a dict, receives the values of every token: tensors `nll` and (with a teacher) `kl`."""
    device = next(model.parameters()).device
    nll = agreement = teacher_kl = 0.0
    num_tokens = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logprobs = torch.log_softmax(model(**inputs).logits[:, :-1, :vocab_size].float(), -1)
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        token_logprobs = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= token_logprobs[mask].sum().item()
        num_tokens += int(mask.sum())
        if per_token is not None:
            per_token.setdefault("nll", []).append(-token_logprobs[mask].cpu())
        if teacher is not None:
            teacher_logprobs = torch.log_softmax(teacher(**inputs).logits[:, :-1, :vocab_size].float(), -1)
            agreed, kl = teacher_agreement_sums(logprobs[mask], teacher_logprobs[mask])
            agreement, teacher_kl = agreement + agreed, teacher_kl + kl
            if per_token is not None:
                per_token.setdefault("kl", []).append(_token_kl(teacher_logprobs[mask], logprobs[mask]))
        elif teacher_cache is not None:
            cache, spans = teacher_cache
            ids, top_logprobs, tail = (t.to(device) for t in cache.batch(spans[start:start + batch_size], mask.cpu()))
            teacher_top1 = ids.gather(-1, top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
            agreement += (logprobs.argmax(-1) == teacher_top1)[mask].sum().item()
            student_buckets = student_topk_tail_logits(logprobs, ids)
            teacher_buckets = teacher_topk_tail_logits(top_logprobs.float(), tail.float())
            teacher_kl += forward_kl(student_buckets, teacher_buckets, mask).item() * int(mask.sum())
            if per_token is not None:
                per_token.setdefault("kl", []).append(_token_kl(torch.log_softmax(teacher_buckets[mask], -1),
                                                                torch.log_softmax(student_buckets[mask], -1)))
    if per_token is not None:
        per_token.update({key: torch.cat(values) for key, values in per_token.items()})
    metrics = {"nll": nll / max(num_tokens, 1)}
    if teacher is not None or teacher_cache is not None:
        metrics["teacher_top1_agreement"] = agreement / max(num_tokens, 1)
        metrics["teacher_kl"] = teacher_kl / max(num_tokens, 1)
    return metrics


def _token_kl(teacher_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of each token [N] from log-probabilities [N, V]."""
    return (teacher_logprobs.exp() * (teacher_logprobs - logprobs)).sum(-1).clamp(min=0).cpu()


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's completion of each prompt (token ids), decoded and stripped: greedy at temperature 0,
    else sampled at `temperature` from a seeded generator (the global random state is left as it was)."""
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    answers = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            # Prompts of different lengths: left-pad so that every completion starts at one column.
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in chunk])
            attention_mask = torch.arange(width) >= torch.tensor([width - len(p) for p in chunk])[:, None]
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device),
                                       max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, synced_gpus=False, **sampling)
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip()
                        for row in generated[:, width:].tolist()]
    return answers


def greedy_exact_match(model, tokenizer, records: list[dict], *, batch_size: int, max_new_tokens: int) -> float:
    """Fraction of prompt/completion `records` whose greedy completion, decoded and stripped,
    equals the reference completion (stripped). Scored by generating, not by likelihood."""
    prompts = [tokenizer(str(r["prompt"])).input_ids for r in records]
    answers = generate_completions(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return exact_match(answers, [str(r["completion"]) for r in records])


def exact_match(answers: list[str], references: list[str]) -> float:
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / max(len(references), 1)


def rouge_l(answers: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of answers against references (Google's `rouge-score`, with its default tokenizer:
    lowercased alphanumeric words, no stemming), the score MiniLLM, DistiLLM and GKD report."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(reference, answer)["rougeL"].fmeasure for answer, reference in zip(answers, references)]
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def generation_tokens_per_second(model, prompt_ids: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Greedy decoding speed of one sequence with the KV cache: median of `repeats` after a warm-up."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    # synced_gpus=False: the main process evaluates alone (a sharded model inside `gathered`, see
    # distill/lm/sharding.py), which transformers would otherwise keep in step with the others
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, synced_gpus=False,
                   pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    seconds = median_seconds(lambda: model.generate(input_ids=input_ids, **options), repeats=repeats,
                             warmup=lambda: model.generate(input_ids=input_ids, **{**options, "max_new_tokens": 4,
                                                                                    "min_new_tokens": 4}))
    return new_tokens / seconds


def evaluate_model(model, *, task, tokenizer, eval_records: list[dict], eval_examples: list[Example],
                   vocab_size: int, batch_size: int, generate_size: int, seed: int, teacher=None,
                   teacher_cache=None, throughput_tokens: int | None = None, per_token: dict | None = None
                   ) -> dict[str, float]:
    """Every metric of one model; `throughput_tokens` also times generation (final evals); `per_token` as
    in `token_metrics`."""
    was_training = model.training
    model.eval()
    metrics = token_metrics(model, eval_examples, vocab_size=vocab_size, batch_size=batch_size,
                            pad_token_id=tokenizer.pad_token_id or 0, teacher=teacher, teacher_cache=teacher_cache,
                            per_token=per_token)
    if task is not None:
        metrics.update(task.evaluate(model, tokenizer, eval_records, batch_size=batch_size,
                                     generate_size=generate_size, seed=seed))
    if throughput_tokens:
        first = eval_examples[0]
        prompt = [t for t, label in zip(first.input_ids, first.labels) if label == IGNORE_INDEX] or first.input_ids[:1]
        metrics["generation_tokens_per_second"] = generation_tokens_per_second(model, prompt, throughput_tokens)
        metrics["parameters"] = count_parameters(model)
    model.train(was_training)
    return metrics
