"""Your own prompt/completion data scored by generating: exact match and ROUGE-L F1 of greedy completions."""
from __future__ import annotations

from distill.lm.evaluate import exact_match, greedy_completions, rouge_l


class CompletionsScorer:
    """For file data whose eval rows all have `prompt` and `completion`: the task metric is the
    fraction of greedy completions equal to the reference (after stripping whitespace); ROUGE-L F1 against
    the reference is reported beside it (the metric of free-form instruction sets)."""

    name = "completions"
    metric = "exact_match"
    higher_is_better = True

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    @classmethod
    def for_records(cls, records: list[dict], tokenizer) -> "CompletionsScorer | None":
        """A scorer if every row is prompt/completion, else None (text and chat data keep nll)."""
        if not records or not all(isinstance(r, dict) and {"prompt", "completion"} <= r.keys() for r in records):
            return None
        longest = max(len(tokenizer(str(r["completion"]), add_special_tokens=False).input_ids) for r in records)
        return cls(max_new_tokens=longest + 1)  # + EOS

    def evaluate(self, model, tokenizer, records: list[dict], *, batch_size: int, generate_size: int,
                 seed: int) -> dict[str, float]:
        if generate_size == 0:
            return {}
        rows = records[:generate_size]
        answers = greedy_completions(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=self.max_new_tokens)
        references = [str(r["completion"]) for r in rows]
        return {"exact_match": exact_match(answers, references), "rouge_l": rouge_l(answers, references)}
