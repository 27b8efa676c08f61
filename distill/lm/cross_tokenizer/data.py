"""Training examples for a teacher and a student with different tokenizers: each row tokenized by both sides (each
with its own special tokens and chat template), and the completion's tokens of both sides grouped into aligned
chunks (distill/lm/cross_tokenizer/align.py) over the completion's text.

The aligned text is what both sides share: the `completion` of a prompt/completion row, the last message's
content of a chat row (each template's markup around it belongs to no chunk), a `text` row's text. A chunk is
used only if both sides can predict its first token from something before it (a BOS, or the prompt), and only
if it lies wholly within both sides' `data.max_length`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.errors import DistillError
from distill.lm.cross_tokenizer.align import align
from distill.lm.data import IGNORE_INDEX, Example


@dataclass
class Side:
    """One side's tokens of a row: ids, labels (IGNORE_INDEX on the prompt), and each token's span in the shared
    text (None outside it)."""

    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int] | None]


@dataclass
class PairedExample:
    """A row as both sides see it, with the chunk of every token (-1: none)."""

    student: Example
    teacher: Example
    student_chunk: list[int]
    teacher_chunk: list[int]
    chunks: int
    text: str


def tokenize_side(record: dict, tokenizer, *, append_eos: bool, index: int, field: str) -> tuple[Side, str]:
    """A row's tokens on one side with their spans in the shared text, and that text."""
    def offsets(text: str, special: bool):
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return encoded.input_ids, [tuple(span) for span in encoded.offset_mapping]

    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(f"the tokenizer {type(tokenizer).__name__} gives no character offsets (a slow tokenizer)",
                           field=field, fix="use a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True), "
                                            "or convert it: transformers.convert_slow_tokenizer)")
    if "messages" in record and getattr(tokenizer, "chat_template", None):
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        content = str(messages[-1]["content"])
        completion = full[len(prompt):]
        where = completion.find(content)
        if where < 0 and content.strip():
            content = content.strip()  # templates that trim the answer
            where = completion.find(content)
        if where < 0:
            raise DistillError(f"row {index}: the chat template of {type(tokenizer).__name__} rewrites the answer, "
                               "so it cannot be found in the templated text", field=field,
                               fix="use prompt/completion rows for this pair of tokenizers")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids, spans = offsets(completion, False)
        spans = [_shift(span, where, len(content)) for span in spans]
    elif "messages" in record:
        messages = record["messages"]
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + f"{messages[-1]['role']}: "
        content = str(messages[-1]["content"])
        prompt_ids = tokenizer(prompt).input_ids
        ids, spans = offsets(content, False)
    elif "prompt" in record and "completion" in record:
        content = str(record["completion"])
        prompt_ids = tokenizer(str(record["prompt"])).input_ids
        ids, spans = offsets(content, False)
    elif "text" in record:
        content = str(record["text"])
        prompt_ids = []
        ids, spans = offsets(content, True)
        spans = [span if token not in tokenizer.all_special_ids else None for token, span in zip(ids, spans)]
    else:
        raise DistillError(f"row {index} has keys {sorted(record)}; expected `prompt`+`completion`, `text`, or "
                           "`messages`", field=field, fix="rename the columns of your data")
    templated = "messages" in record and bool(getattr(tokenizer, "chat_template", None))
    if append_eos and tokenizer.eos_token_id is not None and not (templated and tokenizer.eos_token_id in ids):
        ids, spans = ids + [tokenizer.eos_token_id], spans + [None]  # (the rule of distill.lm.data.tokenize)
    spans = [None] * len(prompt_ids) + spans
    return Side(prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids, spans), content


def _shift(span, offset: int, length: int):
    start, end = span[0] - offset, span[1] - offset
    return None if end <= 0 or start >= length else (max(start, 0), min(end, length))


def pair_examples(records: list[dict], student_tokenizer, teacher_tokenizer, *, max_length: int, append_eos: bool,
                  field: str) -> list[PairedExample]:
    """Every row as both sides tokenize it, cut to `max_length` tokens each, with its aligned chunks."""
    paired = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DistillError(f"row {index} is a {type(record).__name__}, not an object", field=field,
                               fix="each row is an object with `prompt`+`completion`, `text`, or `messages`")
        student, text = tokenize_side(record, student_tokenizer, append_eos=append_eos, index=index, field=field)
        teacher, _ = tokenize_side(record, teacher_tokenizer, append_eos=append_eos, index=index, field=field)
        for side in (student, teacher):
            del side.input_ids[max_length:], side.labels[max_length:], side.spans[max_length:]
        chunks = align(student.spans, teacher.spans, len(text))
        student_chunk, teacher_chunk = [-1] * len(student.input_ids), [-1] * len(teacher.input_ids)
        used = 0
        for chunk in chunks:
            (s0, s1), (t0, t1) = chunk.student, chunk.teacher
            if s0 < 1 or t0 < 1:  # nothing before its first token predicts it
                continue
            student_chunk[s0:s1] = [used] * (s1 - s0)
            teacher_chunk[t0:t1] = [used] * (t1 - t0)
            used += 1
        paired.append(PairedExample(Example(student.input_ids, student.labels, str(record.get("id", index))),
                                    Example(teacher.input_ids, teacher.labels, str(record.get("id", index))),
                                    student_chunk, teacher_chunk, used, text))
    return paired


def collate_pairs(pairs: list[PairedExample], student_pad: int, teacher_pad: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of both sides: input_ids, attention_mask, labels, and `chunk` (-1 on tokens in no
    chunk and on padding), the teacher's under a `teacher_` prefix."""
    out = {}
    for prefix, examples, chunks, pad in (("", [p.student for p in pairs], [p.student_chunk for p in pairs],
                                           student_pad),
                                          ("teacher_", [p.teacher for p in pairs], [p.teacher_chunk for p in pairs],
                                           teacher_pad)):
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        chunk = torch.full((len(examples), width), -1, dtype=torch.long)
        for row, (example, ids) in enumerate(zip(examples, chunks)):
            n = len(example.input_ids)
            input_ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(example.input_ids),
                                                                  torch.tensor(example.labels), 1)
            chunk[row, :n] = torch.tensor(ids)
        out.update({f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels,
                    f"{prefix}chunk": chunk})
    return out


def nll_per_character(nll_per_token: float, examples: list[Example], pairs: list[PairedExample]) -> float:
    """A model's mean NLL per completion token (over `examples`, its own tokens) as nats per character of the
    completion texts: comparable between models that tokenize differently (the EOS token's loss counts too)."""
    tokens = sum(sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples)
    characters = sum(len(pair.text) for pair in pairs)
    return nll_per_token * tokens / max(characters, 1)
