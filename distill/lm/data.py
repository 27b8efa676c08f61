"""Examples in, token tensors out: records (prompt+completion, text, or chat messages; from your files through
distill.lm.records), tokenization with completion-only labels, packing, padding, and a resumable batch order."""
from __future__ import annotations

import math

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from distill.core.errors import DistillError
from distill.lm.records import RowOrigin, read_rows, row_fix, row_problem

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; labels[t] is the token at position t
    id: str = ""  # the row's `id` field, else its index in the file: the key of cached teacher rows
    positions: list[int] | None = None  # position ids of a packed block (restarting per document); None: 0..n-1


def _prompt_and_completion(record: dict, tokenizer, index: int, field: str,
                           origin: RowOrigin | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the part without loss (prompt) and the part with loss (completion)."""
    where = origin.row(index) if origin is not None else f"row {index}"
    problem = row_problem(record)
    if problem is not None:
        raise DistillError(f"{where}: {problem}", field=field, fix=row_fix(problem))
    if "messages" in record:
        messages = record["messages"]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            if not full.startswith(prompt):
                raise DistillError(f"{where}: the chat template does not extend the prompt", field=field,
                                   fix="use prompt/completion rows for this tokenizer")
            # The template writes its own special tokens.
            return (tokenizer(prompt, add_special_tokens=False).input_ids,
                    tokenizer(full[len(prompt):], add_special_tokens=False).input_ids)
        # No template: a plain "role: content" transcript, the last message is the completion.
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + f"{messages[-1]['role']}: "
        return tokenizer(prompt).input_ids, tokenizer(messages[-1]["content"], add_special_tokens=False).input_ids
    if "prompt" in record and "completion" in record:
        return (tokenizer(str(record["prompt"])).input_ids,
                tokenizer(str(record["completion"]), add_special_tokens=False).input_ids)
    return [], tokenizer(str(record["text"])).input_ids  # a `text` row (row_problem allows no other)


def prompt_and_reference(record, tokenizer, index: int) -> tuple[list[int], str, str] | None:
    """(prompt token ids, reference answer, prompt as text) of an eval row with an answer: `prompt` +
    `completion`, or chat `messages` (the prompt is every message before the last, as training tokenizes it,
    with the chat template's generation prompt; the reference is the last message's content; the text is
    `role: content` lines). None for `text` rows."""
    if not isinstance(record, dict) or not ({"prompt", "completion"} <= record.keys() or "messages" in record):
        return None
    prompt_ids, _ = _prompt_and_completion(record, tokenizer, index, "data.eval")
    if "messages" in record:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"][:-1])
        return prompt_ids, str(record["messages"][-1]["content"]), text
    return prompt_ids, str(record["completion"]), str(record["prompt"])


def tokenize(records: list[dict], tokenizer, *, max_length: int, too_long: str, completion_only: bool,
             append_eos: bool, field: str, origin: RowOrigin | None = None) -> list[Example]:
    """Examples with labels masked on the prompt (if completion_only) and an EOS appended. `origin`: the
    file the records came from, which errors name with the row's line."""
    source = f" of `{origin.path}`" if origin is not None else ""
    if not records:
        raise DistillError(f"the dataset{source} is empty", field=field, fix="give a file with at least one row")
    examples, truncated = [], 0
    for index, record in enumerate(records):
        prompt_ids, completion_ids = _prompt_and_completion(record, tokenizer, index, field, origin)
        templated = "messages" in record and bool(getattr(tokenizer, "chat_template", None))
        if append_eos and tokenizer.eos_token_id is not None and not (
                templated and tokenizer.eos_token_id in completion_ids):  # the template ended the turn itself
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
        if len(input_ids) > max_length:
            if too_long == "refuse":
                where = origin.row(index) if origin is not None else f"row {index}"
                raise DistillError(f"{where} has {len(input_ids)} tokens, over max_length={max_length}",
                                   field="data.max_length", fix="raise data.max_length, or set data.too_long=truncate")
            input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], truncated + 1
        examples.append(Example(input_ids, labels, str(record.get("id", index))))
    if truncated:
        warnings.warn(f"{field}: {truncated} of {len(records)} examples cut to data.max_length={max_length} tokens "
                      "(set data.too_long=refuse to stop instead)", stacklevel=2)
    if sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples) == 0:
        raise DistillError(f"no example{source} has a token to learn (all labels masked)", field=field,
                           fix="check completions are non-empty and fit in data.max_length")
    return examples


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Whole examples packed into blocks of at most `max_length` tokens (first-fit decreasing, deterministic):
    position ids restart at each document and its first token carries no loss (nothing before it in its
    document predicts it), so a packed block computes what its documents would unpacked (`model_inputs`
    gives the model the position ids and no 2-D mask: transformers then attends within each document)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    blocks: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = len(examples[index].input_ids)
        slot = next((b for b, free in enumerate(room) if free >= length), None)
        if slot is None:
            blocks.append([]), room.append(max_length)
            slot = len(blocks) - 1
        blocks[slot].append(index)
        room[slot] -= length
    packed = []
    for members in blocks:
        members.sort()  # documents in data order within a block
        input_ids, labels, positions = [], [], []
        for index in members:
            example = examples[index]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX] + example.labels[1:]
            positions += list(range(len(example.input_ids)))
        packed.append(Example(input_ids, labels, "+".join(examples[i].id for i in members), positions))
    return packed


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on padding); for packed
    examples also `position_ids` (the padding is one more document of its own)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.positions is not None for e in examples)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(example.positions or range(length))
            position_ids[row, length:] = torch.arange(width - length)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, "position_ids": position_ids} if packed else batch


def model_inputs(batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor | None]:
    """The keyword arguments of a causal LM's forward for a collated batch: ids and the 2-D padding mask,
    or for a packed batch ids and position ids with no mask (transformers' masking then finds the
    documents from where the positions restart and masks attention across them, for eager and sdpa
    attention alike; flash-attention kernels read the same position ids as varlen boundaries). Call the
    model with use_cache=False: transformers looks for documents only without a KV cache."""
    if f"{prefix}position_ids" in batch:
        return {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": None,
                "position_ids": batch[f"{prefix}position_ids"]}
    return {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}


@torch.no_grad()
def packing_honoured(model) -> bool:
    """Whether `model` computes a packed block as its documents alone (two 4-token documents, float
    tolerance 1e-4): models whose attention masking ignores restarting position ids (some remote-code
    architectures, older mask code) would let documents attend to each other."""
    vocab = model.get_input_embeddings().num_embeddings
    first, second = [Example([3 % vocab, 5 % vocab, 7 % vocab, 2 % vocab], [0] * 4, "a"),
                     Example([4 % vocab, 6 % vocab, 1 % vocab, 3 % vocab], [0] * 4, "b")]
    device = next(model.parameters()).device
    packed = {k: v.to(device) if v is not None else None for k, v in model_inputs(collate(pack(
        [first, second], 8), 0)).items()}
    alone = torch.tensor([first.input_ids, second.input_ids], device=device)
    was_training = model.training
    model.eval()
    together = model(**packed, use_cache=False).logits.float()
    separately = model(input_ids=alone, use_cache=False).logits.float()
    model.train(was_training)
    return torch.allclose(together[0], separately.flatten(0, 1), atol=1e-4, rtol=1e-4)


def check_packing(models: dict) -> None:
    """data.packing: each model must keep packed documents apart (`packing_honoured`). A sharded model is
    not probed (a forward needs every process); it is the same architecture as the unsharded check."""
    from torch.distributed.fsdp import FSDPModule

    for role, model in models.items():
        if model is None or isinstance(model, FSDPModule) or packing_honoured(model):
            continue
        raise DistillError(f"the {role} ({type(model).__name__}) lets packed documents attend to each other: "
                           "its attention ignores restarting position ids", field="data.packing",
                           fix="set data.packing false for this model")


class BatchOrder:
    """Example indices as a function of (seed, position): an endless series of seeded
    permutations. Resuming needs only the position, and every process sees the same order.
    With `weights` (data.weights), each epoch is instead num_examples seeded draws with replacement,
    example i with probability weights[i] / sum(weights)."""

    def __init__(self, num_examples: int, seed: int, weights: list[float] | None = None):
        self.num_examples, self.seed = num_examples, seed
        self.probabilities = None
        if weights is not None:
            array = np.asarray(weights, dtype=np.float64)
            self.probabilities = array / array.sum()

    def take(self, position: int, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            epoch, offset = divmod(position + len(indices), self.num_examples)
            rng = np.random.default_rng([self.seed, epoch])
            order = (rng.permutation(self.num_examples) if self.probabilities is None
                     else rng.choice(self.num_examples, size=self.num_examples, p=self.probabilities))
            indices.extend(order[offset:offset + count - len(indices)].tolist())
        return indices


def row_weights(records: list[dict], column: str | None) -> list[float] | None:
    """Each training row's weight from its `column` (data.weights); a missing, non-numeric or negative one,
    or all zero, is refused with its row number."""
    if column is None:
        return None
    weights = []
    for index, record in enumerate(records):
        value = record.get(column) if isinstance(record, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problem = "has no" if value is None else f"has {value!r} as its"
            raise DistillError(f"training row {index + 1} {problem} `{column}` weight", field="data.weights",
                               fix=f"give every row of data.train a number >= 0 in column `{column}`")
        weights.append(float(value))
    if not any(weights):
        raise DistillError(f"every row's `{column}` weight is 0: nothing to train on", field="data.weights",
                           fix="give some rows a weight above 0")
    return weights


def load_data(spec, tokenizer, task) -> tuple[list[dict], list[dict], list[Example], list[Example]]:
    """(train_records, eval_records, train_examples, eval_examples) of a recipe's `data` section: the
    built-in `task`'s seeded records, or the train/eval files (eval: the last `eval_size` train rows
    when no eval file is given)."""
    train_origin = eval_origin = None
    if task is not None:  # the task's rows, or your own training rows (data.train) scored on the task's
        if spec.train is not None:
            train_records, train_origin = read_rows(spec.train, "data.train", spec.split, spec.fields)
        else:
            train_records = task.records(spec.train_size, spec.seed, "train")
        eval_records = task.records(spec.eval_size, spec.seed, "eval")
        append_eos = task.append_eos
    else:
        fields = spec.fields
        train_records, train_origin = read_rows(spec.train, "data.train", spec.split, fields)
        if spec.eval is not None:
            eval_records, eval_origin = read_rows(spec.eval, "data.eval", spec.eval_split, fields, "data.eval_split")
        elif spec.eval_split is not None:  # another split of the training dataset
            eval_records, eval_origin = read_rows(spec.train, "data.train", spec.eval_split, fields,
                                                  "data.eval_split")
        else:
            train_records, eval_records, eval_origin = split_off_eval(train_records, train_origin, spec)
        append_eos = True
    options = dict(max_length=spec.max_length, too_long=spec.too_long, completion_only=spec.completion_only,
                   append_eos=append_eos)
    train_examples = tokenize(train_records, tokenizer, field="data.train", origin=train_origin, **options)
    if spec.packing:  # training blocks only: eval scores each example on its own
        train_examples = pack(train_examples, spec.max_length)
    eval_examples = tokenize(eval_records, tokenizer, field="data.eval", origin=eval_origin, **options)
    return train_records, eval_records, train_examples, eval_examples


def split_off_eval(rows: list, origin: RowOrigin, spec) -> tuple[list, list, RowOrigin]:
    """(train rows, eval rows, the eval rows' origin): the last `data.eval_size` rows of a training file become
    the eval split when no data.eval is given; a file too short to spare them is refused."""
    if len(rows) <= spec.eval_size:
        raise DistillError(f"`{spec.train}` has {len(rows)} rows, which cannot spare eval_size={spec.eval_size} "
                           "for eval", field="data.eval_size", fix="give data.eval, or lower data.eval_size")
    kept = len(rows) - spec.eval_size
    return rows[:kept], rows[kept:], origin.after(kept)
