"""Regimes: where a micro-batch's sequences and its teacher signal come from, as objects.

A regime sees the trainer only through a `StudentView` (the student's forward, its sampler, sizes and
seed) and returns what it made: a `MicroBatch` (tensors + generation timing) and, for its loss, a
`StepLoss` (loss, logged parts, the teacher's seconds). It never reads or writes the trainer.

- `Distill`: the data's sequences (or the teacher's generations, regime `sequence`), scored by a teacher
  source (live, cached) through the token objective; with no teacher, hard labels only (`alone`).
- `OnPolicy` (GKD): with probability lmbda a micro-batch's completions are the student's own samples.
- `OPD`: every micro-batch is student samples, trained by policy gradient on the teacher's reward.
- `SelfDistill` (OPSD): the teacher is the student itself, given privileged context before the prompt.

Sampling is seeded by (seed, step, micro-batch, rank), so a resumed run samples exactly what the
uninterrupted one did, with no RNG state to save.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from distill.core.errors import DistillError
from distill.lm.data import IGNORE_INDEX, Example, collate
from distill.lm.generate import Generation, sample
from distill.lm.objective import TokenObjective
from distill.losses import cross_entropy
from distill.losses.policy import group_advantages, opd_loss, quality_weights


@dataclass
class Sampling:
    """How a model samples completions (the student on-policy, the teacher for sequence KD)."""

    lmbda: float
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    filter_threshold: float = 0.0  # sequence: reverse speculative decoding against the student (0: off)


@dataclass
class StudentView:
    """What a regime may use of the trainer: the student's forward (with gradients, through the
    distributed engine), its sampler, and the run's sizes and seed. `head` is set on the fused path, where
    the engine returns final hidden states and the objective applies the head chunk by chunk. `autocast`
    is the student's mixed precision (train.precision); `adapters_off`, for a LoRA student, a context in
    which `model` is its base model (the adapters disabled)."""

    model: torch.nn.Module
    engine: torch.nn.Module
    head: torch.nn.Linear | None
    vocab_size: int
    pad_token_id: int
    seed: int
    grad_accum: int
    autocast: Callable[[], AbstractContextManager] = field(default=nullcontext)
    adapters_off: Callable[[], AbstractContextManager] | None = None

    def hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        with self.autocast():
            return self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def logits(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        with self.autocast():
            output = self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
            return self.head(output) if self.head is not None else output.logits

    def base_logits(self, input_ids, attention_mask) -> torch.Tensor:
        """The LoRA student's base model (adapters disabled), without gradients: its initial weights."""
        with torch.no_grad(), self.adapters_off(), self.autocast():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def sample(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator) -> Generation:
        """The current student completes `prompts` (eval mode for the draw; its mode is restored)."""
        return sample(self.model, prompts, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
                      eos_token_id=sampling.eos_token_id, temperature=sampling.temperature, top_p=sampling.top_p,
                      generator=generator, greedy=sampling.temperature == 0, vocab_size=self.vocab_size)


@dataclass
class MicroBatch:
    """A collated micro-batch and what making it cost."""

    tensors: dict[str, torch.Tensor]
    generate_seconds: float = 0.0
    generated_tokens: int = 0
    sampled: bool = False
    sequence_reward: float | None = None


@dataclass
class StepLoss:
    loss: torch.Tensor
    parts: dict[str, float]
    teacher_seconds: float = 0.0


def prompt_of(example: Example) -> list[int]:
    """The tokens before the first one with a loss; at least the first token (e.g. BOS for text rows)."""
    first = next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX and t > 0), len(example.labels))
    return example.input_ids[:max(first, 1)]


def sampling_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator from (seed, step, micro-batch, rank): the coin flip and the samples of a step are the
    same after a resume."""
    state = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def _collate(examples: list[Example], indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    tensors = collate(examples, pad_token_id)
    tensors["example_index"] = torch.tensor(indices, dtype=torch.long)
    return tensors


def place_behavior(batch: dict, behavior: dict[str, list[float]], ids: list[str]) -> torch.Tensor:
    """[B, L - 1]: each row's stored behavior log-probs at its completion positions (0 elsewhere)."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, example_id in enumerate(ids):
        positions = mask[row].nonzero().squeeze(-1)
        values = behavior[example_id]
        if positions.numel() != len(values):
            raise DistillError(f"rollout `{example_id}` has {len(values)} stored log-probs for "
                               f"{positions.numel()} completion tokens", field="regime.rollouts",
                               fix="sample the rollouts again (distill rollouts <recipe> --out NEW_DIR)")
        out[row, positions] = torch.tensor(values, dtype=torch.float32)
    return out


def sampling_settings(recipe, setup, models) -> Sampling:
    """Sampling of on_policy / opd / self / sequence (and `distill rollouts`), checked before training: prompts
    exist, completions fit the context. `setup` needs task, tokenizer and train_examples (an LMSetup)."""
    regime, examples = recipe.regime, setup.train_examples
    prompts = [prompt_of(e) for e in examples]
    if setup.task is None and all(len(p) <= 1 for p in prompts):  # built-in tasks may sample from BOS on purpose
        raise DistillError(f"regime {regime.kind} samples completions for the data's prompts, and these rows have "
                           "none (`text` rows)", field="data.train",
                           fix="use prompt/completion or chat `messages` rows, or regime.kind: off_policy")
    completions = [len(e.input_ids) - len(p) for e, p in zip(examples, prompts)]
    max_new_tokens = regime.max_new_tokens or max(completions)
    longest = max(map(len, prompts)) + max_new_tokens
    for model in models:
        limit = getattr(model.config, "max_position_embeddings", None) if model is not None else None
        if limit is not None and longest > limit:
            raise DistillError(f"a prompt of {max(map(len, prompts))} tokens + max_new_tokens={max_new_tokens} "
                               f"reaches {longest} positions, over the model's {limit}", field="regime.max_new_tokens",
                               fix=f"set regime.max_new_tokens <= {limit - max(map(len, prompts))}")
    eos = setup.tokenizer.eos_token_id if (setup.task is None or setup.task.append_eos) else None
    return Sampling(lmbda=regime.lmbda, max_new_tokens=max_new_tokens, temperature=regime.sample_temperature,
                    top_p=regime.top_p, eos_token_id=eos, filter_threshold=regime.rsd_threshold)


class Distill:
    """Sequences as given, scored by `teacher` (a source with `signal(batch, hidden=...)`), through the
    token objective. `teacher=None` with a hard-label objective trains on labels alone."""

    kind = "off_policy"
    samples = False  # draws from the student (its timing is logged)
    full_logits = False  # needs the student's full logits (no fused path)

    def __init__(self, objective: TokenObjective, teacher=None):
        self.objective, self.teacher = objective, teacher

    def micro_batch(self, examples: list[Example], indices: list[int], student: StudentView, *, step: int,
                    micro: int, rank: int) -> MicroBatch:
        return self._made(MicroBatch(_collate(examples, indices, student.pad_token_id)))

    def ahead(self, examples: list[Example], indices: list[int], student: StudentView) -> None:
        """The micro-batch after this step's, known in advance (the data's sequences): a served teacher starts
        scoring it now. Nothing else is done; `micro_batch` makes it again when its turn comes."""
        if hasattr(self.teacher, "prefetch") and self.objective.uses_teacher:
            self.teacher.prefetch(_collate(examples, indices, student.pad_token_id))

    def _made(self, batch: MicroBatch) -> MicroBatch:
        """A served teacher starts scoring the micro-batch now: the server works while the student trains."""
        teacher = getattr(self, "teacher_model", None) or self.teacher
        if hasattr(teacher, "prefetch") and (self.objective.uses_teacher or self.kind == "opd"):
            teacher.prefetch(batch.tensors)
        return batch

    def loss(self, batch: dict, student: StudentView, num_valid_tokens: int) -> StepLoss:
        signal, seconds = None, 0.0
        if self.teacher is not None and self.objective.uses_teacher:
            started = time.perf_counter()
            signal = self.teacher.signal(batch, hidden=student.head is not None)
            seconds = time.perf_counter() - started
        loss, parts = self.objective.loss(student, batch, signal, num_valid_tokens)
        if signal is not None and hasattr(self.teacher, "release"):
            self.teacher.release()  # a sharded teacher's gathered head is no longer needed
        return StepLoss(loss, parts, seconds)

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)


def _sampled(generation: Generation) -> dict:
    return dict(generate_seconds=generation.seconds, generated_tokens=generation.new_tokens, sampled=True)


class OnPolicy(Distill):
    """GKD: with probability `sampling.lmbda`, the micro-batch's prompts completed by the current student."""

    kind = "on_policy"
    samples = True

    def __init__(self, objective: TokenObjective, teacher, sampling: Sampling):
        super().__init__(objective, teacher)
        self.sampling = sampling

    def draw(self, examples: list[Example], student: StudentView, generator: torch.Generator) -> Generation | None:
        """The student's completions of the examples' prompts, or None when the coin says data."""
        if self.sampling.lmbda < 1.0 and float(torch.rand((), generator=generator)) >= self.sampling.lmbda:
            return None
        return student.sample([prompt_of(e) for e in examples], self.sampling, generator)

    def micro_batch(self, examples, indices, student, *, step, micro, rank) -> MicroBatch:
        generation = self.draw(examples, student, sampling_generator(student.seed, step, micro, rank))
        if generation is None:
            return self._made(MicroBatch(_collate(examples, indices, student.pad_token_id)))
        return self._made(MicroBatch(_collate(generation.to_examples(), indices, student.pad_token_id),
                                     **_sampled(generation)))


class OPD(Distill):
    """On-policy distillation as RL (distill/losses/policy.py): batch_size / group_size prompts, each
    completed group_size times by the student; per-token reward scale * (log p_T - log p_ref) - (log p_S -
    log p_ref) with the reference the initial student (unused at scale 1; `"base"`: a LoRA student's base,
    adapters disabled), plus an optional verifiable sequence reward centred within each group. `teacher` is a
    causal LM, or a served teacher (its `token_logprobs`)."""

    kind = "opd"
    samples = True
    full_logits = True

    def __init__(self, objective: TokenObjective, teacher, sampling: Sampling, *, scale: float = 1.0,
                 reference: torch.nn.Module | str | None = None,
                 reward_fn: Callable[[list[str], list[str]], list[float]] | None = None, reward_weight: float = 1.0,
                 group_size: int = 1, decode: Callable[[list[int]], str] | None = None, options=None,
                 rollouts: dict[str, list[float]] | None = None):
        super().__init__(objective, None)
        self.teacher_model, self.sampling, self.scale, self.reference = teacher, sampling, scale, reference
        self.reward_fn, self.reward_weight, self.group_size, self.decode = reward_fn, reward_weight, group_size, decode
        self.options = options  # recipe.regime.opd (an OPDSpec), None: every option off
        # offline OPD (distill/lm/rollouts.py): the examples are stored samples; id -> the sampler's log-probs
        self.rollouts = rollouts

    def micro_batch(self, examples, indices, student, *, step, micro, rank) -> MicroBatch:
        if self.rollouts is not None:  # stored samples: nothing to draw
            tensors = _collate(examples, indices, student.pad_token_id)
            tensors["behavior_logprobs"] = place_behavior(tensors, self.rollouts, [e.id for e in examples])
            return self._made(MicroBatch(tensors))
        prompts = [prompt_of(e) for e in examples[:len(examples) // self.group_size] for _ in range(self.group_size)]
        generation = student.sample(prompts, self.sampling, sampling_generator(student.seed, step, micro, rank))
        tensors = _collate(generation.to_examples(), indices, student.pad_token_id)
        reward = None
        if self.reward_fn is not None:
            rewards = self.reward_fn([self.decode(p) for p in generation.prompts()],
                                     [self.decode(c) for c in generation.completions()])
            rewards = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
            reward = float(rewards.mean()) / student.grad_accum  # the step's mean over micro-batches
            tensors["sequence_advantage"] = group_advantages(rewards, self.group_size)
        return self._made(MicroBatch(tensors, sequence_reward=reward, **_sampled(generation)))

    def loss(self, batch: dict, student: StudentView, num_valid_tokens: int) -> StepLoss:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        index = labels.clamp(min=0).unsqueeze(-1)

        def sampled_logprobs(logits):
            return torch.log_softmax(logits[:, :-1, :student.vocab_size].float(), -1).gather(-1, index).squeeze(-1)

        student_logprobs = sampled_logprobs(student.logits(**inputs))
        started = time.perf_counter()
        with torch.no_grad():
            if hasattr(self.teacher_model, "token_logprobs"):  # a served teacher: the sampled tokens' log-probs
                teacher = self.teacher_model.token_logprobs(batch)
            else:
                teacher = sampled_logprobs(self.teacher_model(**inputs).logits)
            reference = None
            if self.reference == "base":
                reference = sampled_logprobs(student.base_logits(**inputs))
            elif self.reference is not None:
                reference = sampled_logprobs(self.reference(**inputs).logits)
        seconds = time.perf_counter() - started
        options = self.options
        extra = {}
        if options is not None:
            extra = dict(estimator=options.estimator, reward_clip=options.reward_clip, baseline=options.baseline,
                         sample_weights=quality_weights(teacher, mask, options.gate, options.gated_weight),
                         ratio_clip=options.ratio_clip)
        behavior = batch.get("behavior_logprobs")
        loss, diagnostics = opd_loss(student_logprobs, teacher, mask, reference_logprobs=reference, scale=self.scale,
                                     sequence_advantages=batch.get("sequence_advantage"),
                                     reward_weight=self.reward_weight, num_valid_tokens=num_valid_tokens,
                                     behavior_logprobs=behavior.to(student_logprobs.device) if behavior is not None
                                     else None, **extra)
        record = {"loss": loss.item(), "kd": diagnostics["reverse_kl"], "reward_std": diagnostics["reward_std"]}
        if options is not None and options.gate is not None:
            record["kept"] = diagnostics["kept"]
        if behavior is not None:  # offline: how far the student moved from the rollouts' sampler
            record["clipped"] = diagnostics["clipped"]
        return StepLoss(loss, record, seconds)


class SelfDistill(OnPolicy):
    """OPSD: the student on (prompt, y) learns from itself on (privileged context, prompt, y), over the
    tokens of y (the student's sample with probability lmbda, else the data's completion). The teacher is
    `snapshot` (the initial student, frozen), a LoRA student's base model with its adapters disabled
    (`base_teacher`: the initial student too, with no second copy of the weights) or, else, the current
    weights under no_grad."""

    kind = "self"
    full_logits = True

    def __init__(self, objective: TokenObjective, sampling: Sampling, teacher_prompts: dict[str, list[int]],
                 snapshot: torch.nn.Module | None = None, base_teacher: bool = False):
        super().__init__(objective, None, sampling)
        self.teacher_prompts, self.snapshot, self.base_teacher = teacher_prompts, snapshot, base_teacher

    def micro_batch(self, examples, indices, student, *, step, micro, rank) -> MicroBatch:
        generation = self.draw(examples, student, sampling_generator(student.seed, step, micro, rank))
        completed = generation.to_examples() if generation is not None else examples
        teacher_examples = []
        for original, example in zip(examples, completed):
            completion = example.input_ids[len(prompt_of(example)):]
            prompt = self.teacher_prompts[original.id]
            teacher_examples.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, original.id))
        tensors = _collate(completed, indices, student.pad_token_id)
        tensors.update({f"teacher_{k}": v for k, v in collate(teacher_examples, student.pad_token_id).items()})
        return MicroBatch(tensors, **(_sampled(generation) if generation is not None else {}))

    def loss(self, batch: dict, student: StudentView, num_valid_tokens: int) -> StepLoss:
        objective, spec = self.objective, self.objective.spec
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logits = student.logits(batch["input_ids"], batch["attention_mask"])[:, :-1, :student.vocab_size]
        started = time.perf_counter()
        teacher_inputs = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
        if self.base_teacher:
            teacher_logits = student.base_logits(**teacher_inputs)
        else:
            with torch.no_grad(), student.autocast():
                teacher = self.snapshot if self.snapshot is not None else student.model
                teacher_logits = teacher(**teacher_inputs).logits
        teacher_logits = teacher_logits[:, :-1, :student.vocab_size]
        seconds = time.perf_counter() - started
        teacher_mask = batch["teacher_labels"][:, 1:] != IGNORE_INDEX
        # Both sides hold the same completion tokens in the same order: align by position in y.
        kd = objective.divergence_value(logits[mask], teacher_logits[teacher_mask], None, num_valid_tokens)
        loss, parts = spec.kd_weight * kd, {"kd": kd.item()}
        if spec.ce_weight > 0:
            ce = cross_entropy(logits, labels, mask, num_valid_tokens=num_valid_tokens)
            loss, parts["ce"] = loss + spec.ce_weight * ce, ce.item()
        parts["loss"] = loss.item()
        return StepLoss(loss, parts, seconds)


@dataclass
class StepTiming:
    """What a step's micro-batches cost to make (losses.jsonl of sampling regimes)."""

    generate_seconds: float = 0.0
    generated_tokens: int = 0
    sampled_batches: int = 0
    sequence_reward: float | None = None

    def add(self, batch: MicroBatch) -> None:
        self.generate_seconds += batch.generate_seconds
        self.generated_tokens += batch.generated_tokens
        self.sampled_batches += int(batch.sampled)
        if batch.sequence_reward is not None:
            self.sequence_reward = (self.sequence_reward or 0.0) + batch.sequence_reward

    def record(self) -> dict:
        record = {"generate_seconds": self.generate_seconds, "generated_tokens": self.generated_tokens,
                  "sampled_batches": self.sampled_batches}
        if self.sequence_reward is not None:
            record["sequence_reward"] = self.sequence_reward
        return record
