"""Your own prompt/completion or chat data scored by generating: exact match and ROUGE-L F1 of the
model's completions (greedy, or sampled at eval.sample_temperature) against the reference answers."""
from __future__ import annotations

from distill.core.errors import DistillError
from distill.lm.data import prompt_and_reference
from distill.lm.evaluate import exact_match, generate_completions, rouge_l


class CompletionsScorer:
    """For eval rows that all have a reference answer (`prompt` + `completion`, or chat `messages` whose last
    message is the answer): each of the first `generate_size` prompts is completed by the model and scored
    against the reference. Exact match (after stripping whitespace) is the primary metric of prompt/completion
    data (answers with one right form); ROUGE-L F1 of chat data (free-form answers, as the instruction sets of
    MiniLLM, DistiLLM and GKD); `eval.metric` chooses."""

    name = "completions"
    higher_is_better = True
    EXAMPLES = 3  # generations per model kept for the report

    def __init__(self, prompts: list[list[int]], references: list[str], *, metric: str, max_new_tokens: int,
                 temperature: float = 0.0, prompt_texts: list[str] | None = None):
        self.prompts, self.references, self.metric = prompts, references, metric
        self.prompt_texts = prompt_texts or [""] * len(prompts)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.last_answers: list[str] = []  # the latest evaluation's first EXAMPLES completions

    @classmethod
    def for_records(cls, records: list[dict], tokenizer, *, metric: str | None = None,
                    temperature: float = 0.0) -> "CompletionsScorer | None":
        """A scorer if every row has a reference answer, else None (text data keeps nll as its metric)."""
        pairs = [prompt_and_reference(r, tokenizer, index) for index, r in enumerate(records)]
        if not records or any(pair is None for pair in pairs):
            if metric in ("exact_match", "rouge_l"):
                raise DistillError(f"eval.metric {metric} scores generated answers, and these eval rows have no "
                                   "reference answer (text rows)", field="eval.metric",
                                   fix="use prompt/completion or chat `messages` rows for data.eval, or eval.metric: nll")
            return None
        chat = any(isinstance(r, dict) and "messages" in r for r in records)
        longest = max(len(tokenizer(reference, add_special_tokens=False).input_ids) for _, reference, _ in pairs)
        return cls([p for p, _, _ in pairs], [r for _, r, _ in pairs], prompt_texts=[t for _, _, t in pairs],
                   metric=metric or ("rouge_l" if chat else "exact_match"), max_new_tokens=longest + 1,  # + EOS
                   temperature=temperature)

    @classmethod
    def for_eval(cls, spec, records: list[dict], tokenizer) -> "CompletionsScorer | None":
        """The scorer a recipe's `eval` section asks for (None: nll is the primary metric)."""
        if spec.metric == "nll":
            return None
        return cls.for_records(records, tokenizer, metric=spec.metric, temperature=spec.sample_temperature)

    def evaluate(self, model, tokenizer, records: list[dict], *, batch_size: int, generate_size: int,
                 seed: int) -> dict[str, float]:
        if generate_size == 0:
            return {}
        prompts, references = self.prompts[:generate_size], self.references[:generate_size]
        answers = generate_completions(model, tokenizer, prompts, batch_size=batch_size,
                                       max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)
        self.last_answers = answers[:self.EXAMPLES]
        return {"exact_match": exact_match(answers, references), "rouge_l": rouge_l(answers, references)}

    def examples(self) -> dict[str, list[str]]:
        """The prompts and references of the generations the report shows."""
        return {"prompt": self.prompt_texts[:self.EXAMPLES], "reference": self.references[:self.EXAMPLES]}
