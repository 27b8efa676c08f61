"""Preference distillation (regime `preference`): pairs of completions of one prompt, a chosen y_w and a
rejected y_l, trained with a preference loss of distill/losses/preference.py (objective.loss dpo | redi | dckd)
plus, with objective.ce_weight, cross-entropy on the chosen completion (SFT on y_w).

Data: rows `prompt` + `chosen` + `rejected` (text); chat rows `messages` (the prompt conversation) + `chosen` +
`rejected` (each reply as text or one {role, content} message); or `chosen` + `rejected` alone, two whole
conversations that differ only in their last message (the shared part is the prompt, TRL's implicit prompt).
Each pair becomes the two rows the rest of distill knows (prompt + completion, or messages), tokenized as
any row is, and one `PreferenceExample`: the chosen completion as a plain `Example`, holding the rejected
one. The `alone` row trains on the chosen completions (SFT on chosen) and evaluation scores them as any row's
completion. A built-in task gives its pairs through `preference_records` (arithmetic: the correct sum and
a plausible wrong one); its eval rows stay the task's.

A micro-batch is the chosen sequences of its pairs followed by their rejected ones, one forward of the
student over both. Each micro-batch's loss is the paper's (a mean over its pairs, or over its tokens for
DCKD); a step's loss is the mean over its micro-batches and processes (exact for DPO and REDI, whose
micro-batches hold equally many pairs).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from distill.core.errors import DistillError
from distill.core.recipe import encodable, shown
from distill.lm.data import IGNORE_INDEX, Example, collate, split_off_eval, tokenize
from distill.lm.records import read_rows, row_fix, row_problem
from distill.lm.recipe import ObjectiveSpec
from distill.lm.regimes import MicroBatch, Sampling, StepLoss, StudentView, prompt_of, sampling_generator
from distill.losses import cross_entropy, get_spec
from distill.losses.preference import sequence_logprobs

PAIR_SHAPES = ("an object with `prompt` + `chosen` + `rejected` (text), chat `messages` (the prompt) + `chosen` + "
               "`rejected` (each reply text or one {role, content} message), or `chosen` + `rejected` whole "
               "conversations that differ only in their last message")


@dataclass
class PreferenceExample(Example):
    """The chosen completion of a pair (an ordinary Example: SFT on chosen), holding the rejected one."""

    rejected: Example | None = None


# ---- rows ---------------------------------------------------------------------------------------------

def pair_rows(record) -> tuple[dict, dict] | str:
    """(chosen row, rejected row) of a preference row, each a row of the usual shapes (prompt + completion, or
    `messages` whose last message is the completion), or what is wrong with it (a string)."""
    if not isinstance(record, dict):
        return f"the row is a {type(record).__name__}, not an object"
    if not {"chosen", "rejected"} <= record.keys():
        return f"the row has keys {sorted(map(str, record))}; regime preference expects `chosen` + `rejected`"
    if "prompt" in record and "messages" in record:
        return "the row has both `prompt` and `messages`: give the prompt once"
    prompt = record.get("messages", record.get("prompt"))
    key = "messages" if "messages" in record else "prompt" if "prompt" in record else None
    if key is not None and (not isinstance(prompt, (str, int, float, bool, list)) or prompt == [] or (
            key == "messages" and not isinstance(prompt, list))):
        return f"`{key}` is {shown(prompt)}: give the prompt as text or as a non-empty list of {{role, content}}"
    rows = []
    for key in ("chosen", "rejected"):
        reply = record[key]
        if prompt is None:  # TRL's implicit prompt: two conversations sharing all but their last message
            if not isinstance(reply, list) or len(reply) < 2:
                return (f"without `prompt` or `messages`, `{key}` is a whole conversation: a list of at least two "
                        f"{{role, content}} messages, the last being the reply; got {shown(reply)}")
            row = {"messages": reply}
        elif isinstance(prompt, list):  # a chat prompt: the reply is one more message
            if isinstance(reply, (str, int, float, bool)):
                reply = [{"role": "assistant", "content": str(reply)}]
            elif isinstance(reply, dict):
                reply = [reply]
            if not isinstance(reply, list) or len(reply) != 1:
                return f"`{key}` is {shown(reply)}: give the reply as text or as one {{role, content}} message"
            row = {"messages": prompt + reply}
        else:
            if not isinstance(reply, (str, int, float, bool)) or (isinstance(reply, str) and not encodable(reply)):
                return f"`{key}` is {shown(reply)}, not text" + (
                    " (give the prompt as chat `messages` to pair it with messages)" if isinstance(reply, (
                        list, dict)) else "")
            row = {"prompt": prompt, "completion": reply}
        problem = row_problem(row)
        if problem is not None:
            return f"`{key}`: {problem}" if "messages" in row else problem
        rows.append({**row, **({"id": record["id"]} if "id" in record else {})})
    if prompt is None and rows[0]["messages"][:-1] != rows[1]["messages"][:-1]:
        return "`chosen` and `rejected` are whole conversations and must share every message but the last (the prompt)"
    return rows[0], rows[1]


def pair_problem(record) -> str | None:
    """What keeps `record` from being a preference row (None: nothing)."""
    rows = pair_rows(record)
    return rows if isinstance(rows, str) else None


def pair_fix(problem: str) -> str:
    return f"each row is {PAIR_SHAPES}"


def eval_problem(record) -> str | None:
    """Eval rows: preference rows (scored on their chosen completion) or plain rows."""
    if isinstance(record, dict) and {"chosen", "rejected"} & record.keys():
        return pair_problem(record)
    return row_problem(record)


def eval_fix(problem: str) -> str:
    return row_fix(problem) + f", or {PAIR_SHAPES}"


def load_preference_data(spec, tokenizer, task) -> tuple[list[dict], list[dict], list[PreferenceExample], list[Example]]:
    """(train_records, eval_records, train_examples, eval_examples) of regime preference, as `data.load_data`
    gives them for other regimes: the records are the chosen rows (prompt + completion, or messages), the
    training examples `PreferenceExample`s (chosen, holding rejected)."""
    train_origin = eval_origin = None
    if task is not None:
        if not hasattr(task, "preference_records"):
            raise DistillError(f"the built-in task {task.name} has no preference pairs", field="data.builtin",
                               fix="use data.builtin: arithmetic, or data.train with prompt/chosen/rejected rows")
        rows = task.preference_records(spec.train_size, spec.seed, "train")
        eval_rows = task.records(spec.eval_size, spec.seed, "eval")  # the task's evaluation, unchanged
        append_eos = task.append_eos
    else:
        checks = dict(problem=pair_problem, fix=pair_fix)
        rows, train_origin = read_rows(spec.train, "data.train", spec.split, spec.fields, **checks)
        evaluation = dict(problem=eval_problem, fix=eval_fix)
        if spec.eval is not None:
            eval_rows, eval_origin = read_rows(spec.eval, "data.eval", spec.eval_split, spec.fields,
                                               "data.eval_split", **evaluation)
        elif spec.eval_split is not None:  # another split of the training dataset
            eval_rows, eval_origin = read_rows(spec.train, "data.train", spec.eval_split, spec.fields,
                                               "data.eval_split", **evaluation)
        else:
            rows, eval_rows, eval_origin = split_off_eval(rows, train_origin, spec)
        append_eos = True
    pairs = [pair_rows(row) for row in rows]
    eval_records = [pair_rows(row)[0] if isinstance(row, dict) and "chosen" in row else row for row in eval_rows]
    options = dict(max_length=spec.max_length, too_long=spec.too_long, completion_only=spec.completion_only,
                   append_eos=append_eos)
    chosen = tokenize([c for c, _ in pairs], tokenizer, field="data.train", origin=train_origin, **options)
    rejected = tokenize([r for _, r in pairs], tokenizer, field="data.train", origin=train_origin, **options)
    examples = [PreferenceExample(c.input_ids, c.labels, c.id, rejected=r) for c, r in zip(chosen, rejected)]
    eval_examples = tokenize(eval_records, tokenizer, field="data.eval", origin=eval_origin, **options)
    return [c for c, _ in pairs], eval_records, examples, eval_examples


def rejected_examples(examples: list[Example]) -> list[Example]:
    """The rejected completions among `examples` (none unless they are preference pairs)."""
    return [e.rejected for e in examples if getattr(e, "rejected", None) is not None]


# ---- the regime ---------------------------------------------------------------------------------------

class PreferenceObjective:
    """objective.loss (a preference loss) with its checked parameters, kd_weight (its weight) and ce_weight
    (SFT on chosen). Stateless; the trainer's objective interface (`fusable`, `end_step`) is trivial here."""

    fusable = False  # sequence log-probs and the teacher's full distributions: plain logits

    def __init__(self, spec: ObjectiveSpec):
        self.spec, self.name = spec, spec.loss
        self.fn, self.params = get_spec(spec.loss, kind="preference").fn, spec.loss_params()

    def end_step(self, kd_total: float, progress: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Preference:
    """Pairs of the data, chosen then rejected in one micro-batch, scored by the student and (dpo) the
    reference or (dckd) the teacher. `reference`: a frozen model (the initial student, or the teacher), or
    "base" (a LoRA student's base model, its adapters disabled); `teacher`: the model dckd distils from."""

    kind = "preference"
    samples = False
    full_logits = True

    def __init__(self, objective: PreferenceObjective, *, reference: torch.nn.Module | str | None = None,
                 teacher: torch.nn.Module | None = None, world_size: int = 1):
        self.objective, self.reference, self.teacher, self.world_size = objective, reference, teacher, world_size

    def micro_batch(self, examples: list[PreferenceExample], indices: list[int], student: StudentView, *, step: int,
                    micro: int, rank: int) -> MicroBatch:
        tensors = collate([*examples, *(e.rejected for e in examples)], student.pad_token_id)
        tensors["example_index"] = torch.tensor(indices + indices, dtype=torch.long)
        return MicroBatch(tensors)

    def ahead(self, examples, indices, student) -> None:
        """(No served teacher to start early.)"""

    def loss(self, batch: dict, student: StudentView, num_valid_tokens: int) -> StepLoss:
        spec = self.objective.spec
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        mask = labels != IGNORE_INDEX
        logits = student.logits(**inputs)[:, :-1, :student.vocab_size]
        share = 1.0 / (student.grad_accum * self.world_size)  # this micro-batch's part of the step's mean
        pairs = labels.shape[0] // 2
        loss, parts, seconds = logits.new_zeros((), dtype=torch.float32), {}, 0.0
        if spec.kd_weight > 0:
            term, diagnostics, seconds = self.term(logits, labels, mask, inputs, student)
            loss = loss + spec.kd_weight * term
            parts.update({"kd": term.item() * share, **{k: v * share for k, v in diagnostics.items()}})
        if spec.ce_weight > 0:  # SFT on the chosen completions
            ce = cross_entropy(logits[:pairs], labels[:pairs], mask[:pairs])
            loss, parts["ce"] = loss + spec.ce_weight * ce, ce.item() * share
        parts["loss"] = loss.item() * share
        return StepLoss(loss * share, parts, seconds)

    def term(self, logits, labels, mask, inputs, student: StudentView) -> tuple[torch.Tensor, dict, float]:
        """(the preference loss of a micro-batch, its diagnostics, the seconds other models took)."""
        fn, params, pairs = self.objective.fn, self.objective.params, labels.shape[0] // 2
        chosen, rejected = slice(0, pairs), slice(pairs, None)
        started = time.perf_counter()
        if self.objective.name == "dckd":
            with torch.no_grad():
                teacher = self.teacher(**inputs, use_cache=False).logits[:, :-1, :student.vocab_size]
            seconds = time.perf_counter() - started
            return fn(logits[chosen], teacher[chosen], mask[chosen], logits[rejected], teacher[rejected],
                      mask[rejected], **params), {}, seconds
        policy = sequence_logprobs(logits, labels, mask)
        if self.objective.name == "redi":
            lengths = mask.sum(-1)
            return fn(policy[chosen], lengths[chosen], policy[rejected], lengths[rejected], **params), {}, 0.0
        with torch.no_grad():  # dpo: the reference's summed log-probs of the same tokens
            if self.reference == "base":
                reference_logits = student.base_logits(**inputs)
            else:
                reference_logits = self.reference(**inputs, use_cache=False).logits
            reference = sequence_logprobs(reference_logits[:, :-1, :student.vocab_size], labels, mask)
        seconds = time.perf_counter() - started
        loss = fn(policy[chosen], policy[rejected], reference[chosen], reference[rejected], **params)
        ratios = (policy - reference).detach()
        margins = params["beta"] * (ratios[chosen] - ratios[rejected])  # the implicit reward's margin
        return loss, {"reward_margin": margins.mean().item(),
                      "reward_accuracy": (margins > 0).float().mean().item()}, seconds

    def state_dict(self) -> dict:
        return {}  # nothing changes across steps (the reference is frozen, sampling none)

    def load_state_dict(self, state: dict) -> None:
        pass


class AdvantageGuided(Preference):
    """ADPA (Gao et al. 2025): the student samples a completion for the prompt of each pair, and learns from the
    aligned teacher's advantage over its own reference on those samples (`adpa_loss`: minus the student's
    expected advantage at every position, over the whole vocabulary); objective.ce_weight adds SFT on the
    pairs' chosen completions. A micro-batch holds the chosen sequences, then the samples."""

    samples = True

    def __init__(self, objective: PreferenceObjective, *, teacher: torch.nn.Module,
                 teacher_reference: torch.nn.Module, sampling: Sampling, world_size: int = 1):
        super().__init__(objective, teacher=teacher, world_size=world_size)
        self.teacher_reference, self.sampling = teacher_reference, sampling

    def micro_batch(self, examples, indices, student, *, step, micro, rank) -> MicroBatch:
        generation = student.sample([prompt_of(e) for e in examples], self.sampling,
                                    sampling_generator(student.seed, step, micro, rank))
        tensors = collate([*examples, *generation.to_examples()], student.pad_token_id)
        tensors["example_index"] = torch.tensor(indices + indices, dtype=torch.long)
        return MicroBatch(tensors, generate_seconds=generation.seconds, generated_tokens=generation.new_tokens,
                          sampled=True)

    def term(self, logits, labels, mask, inputs, student: StudentView) -> tuple[torch.Tensor, dict, float]:
        pairs = labels.shape[0] // 2
        samples = slice(pairs, None)
        started = time.perf_counter()
        sampled = {key: value[samples] for key, value in inputs.items()}
        with torch.no_grad():
            aligned = self.teacher(**sampled, use_cache=False).logits[:, :-1, :student.vocab_size]
            reference = self.teacher_reference(**sampled, use_cache=False).logits[:, :-1, :student.vocab_size]
        seconds = time.perf_counter() - started
        loss = self.objective.fn(logits[samples], aligned, reference, mask[samples], **self.objective.params)
        return loss, {"expected_advantage": -loss.item()}, seconds


def preference_regime(recipe, student, teacher, device, world_size: int, *, sampling: Sampling | None = None,
                      teacher_reference: torch.nn.Module | None = None) -> Preference:
    """The distilled row's regime of a recipe with regime.kind preference: dpo's reference (regime.preference.
    reference: the initial student, frozen, or a LoRA student's base; or the teacher), dckd's teacher."""
    objective = PreferenceObjective(recipe.objective)
    if objective.name == "adpa":
        return AdvantageGuided(objective, teacher=teacher, teacher_reference=teacher_reference.to(device),
                               sampling=sampling, world_size=world_size)
    reference = None
    if objective.name == "dpo" and recipe.objective.kd_weight > 0:
        if recipe.regime.preference.reference == "teacher":
            reference = teacher
        elif recipe.student.lora is not None:  # the base model with its adapters disabled: no second copy
            reference = "base"
        else:
            reference = copy.deepcopy(student).eval().requires_grad_(False).to(device)
    return Preference(objective, reference=reference, teacher=teacher if objective.name == "dckd" else None,
                      world_size=world_size)
