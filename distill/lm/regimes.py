"""The regimes where the student samples its own completions: on-policy KD (GKD), on-policy
distillation as RL (OPD) and on-policy self-distillation with privileged context (OPSD). The trainer calls these while it builds a step's micro-batches and,
for OPD, for the loss; sampling is seeded by (seed, step, micro-batch, rank), so a resumed run
samples exactly what the uninterrupted one did."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from distill.lm.data import IGNORE_INDEX, Example
from distill.losses.policy import group_advantages, opd_loss


@dataclass
class OnPolicy:
    """How the student samples its own completions (GKD's on-policy mixture)."""

    lmbda: float
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    filter_threshold: float = 0.0  # sequence: reverse speculative decoding against the student (0: off)


@dataclass
class OPD:
    """On-policy distillation as RL (distill/losses/policy.py): sampling, reward scale, reference
    model (the initial student, frozen; unused at scale 1), optional verifiable sequence reward."""

    sampling: OnPolicy
    scale: float = 1.0
    reference: torch.nn.Module | None = None
    reward_fn: Callable[[list[str], list[str]], list[float]] | None = None
    reward_weight: float = 1.0
    group_size: int = 1
    decode: Callable[[list[int]], str] | None = None


@dataclass
class SelfDistill:
    """OPSD: the teacher is the student's own model conditioned on privileged context (e.g. the
    reference solution) before the prompt; the student sees the prompt only. `snapshot` is a
    frozen copy of the initial student, or None to use the current weights under no_grad."""

    sampling: OnPolicy
    teacher_prompts: dict[str, list[int]]  # example id -> privileged context + prompt, tokenized
    snapshot: torch.nn.Module | None = None


def prompt_of(example: Example) -> list[int]:
    """The tokens before the first one with a loss; at least the first token (e.g. BOS for text rows)."""
    first = next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX and t > 0), len(example.labels))
    return example.input_ids[:max(first, 1)]


def sampling_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator from (seed, step, micro-batch, rank): the coin flip and the samples of a step are
    the same after a resume, with no RNG state to save."""
    import numpy as np

    state = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def student_samples(trainer, examples: list[Example], step: int, micro: int, rank: int, timing: dict,
                    policy: OnPolicy | None = None) -> list[Example]:
    """With probability lmbda, the batch's prompts completed by the current student (sampled)."""
    policy = policy or trainer.phase.on_policy
    generator = sampling_generator(trainer.spec.seed, step, micro, rank)
    if policy.lmbda < 1.0 and float(torch.rand((), generator=generator)) >= policy.lmbda:
        return examples
    from distill.lm.generate import sample

    generation = sample(trainer.model, [prompt_of(e) for e in examples], max_new_tokens=policy.max_new_tokens,
                        pad_token_id=trainer.pad_token_id, eos_token_id=policy.eos_token_id,
                        temperature=policy.temperature, top_p=policy.top_p, generator=generator,
                        greedy=policy.temperature == 0, vocab_size=trainer.vocab_size)
    trainer.engine.train()  # sampling ran in eval mode
    timing["generate_seconds"] += generation.seconds
    timing["generated_tokens"] += generation.new_tokens
    timing["sampled_batches"] += 1
    return generation.to_examples()


def opd_samples(trainer, examples: list[Example], step: int, micro: int, rank: int,
                timing: dict) -> tuple[list[Example], torch.Tensor | None]:
    """batch_size / group_size prompts, each completed group_size times by the student; the
    sequence rewards' group advantages (None without a reward function)."""
    opd = trainer.phase.opd
    policy = opd.sampling
    prompts = [prompt_of(e) for e in examples[:len(examples) // opd.group_size] for _ in range(opd.group_size)]
    from distill.lm.generate import sample

    generation = sample(trainer.model, prompts, max_new_tokens=policy.max_new_tokens,
                        pad_token_id=trainer.pad_token_id, eos_token_id=policy.eos_token_id,
                        temperature=policy.temperature, top_p=policy.top_p,
                        generator=sampling_generator(trainer.spec.seed, step, micro, rank),
                        greedy=policy.temperature == 0, vocab_size=trainer.vocab_size)
    trainer.engine.train()
    timing["generate_seconds"] += generation.seconds
    timing["generated_tokens"] += generation.new_tokens
    timing["sampled_batches"] += 1
    advantages = None
    if opd.reward_fn is not None:
        rewards = opd.reward_fn([opd.decode(p) for p in generation.prompts()],
                                [opd.decode(c) for c in generation.completions()])
        rewards = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
        share = float(rewards.mean()) / trainer.spec.grad_accum  # the step's mean over micro-batches
        timing["sequence_reward"] = timing.get("sequence_reward", 0.0) + share
        advantages = group_advantages(rewards, opd.group_size)
    return generation.to_examples(), advantages


def opd_step_loss(trainer, batch: dict, num_valid_tokens: int) -> tuple[torch.Tensor, dict]:
    """Policy gradient on the student's samples with the teacher's per-token reward."""
    opd = trainer.phase.opd
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    index = labels.clamp(min=0).unsqueeze(-1)

    def sampled_logprobs(model):
        logits = model(**inputs).logits[:, :-1, :trainer.vocab_size].float()
        return torch.log_softmax(logits, -1).gather(-1, index).squeeze(-1)

    student = sampled_logprobs(trainer.engine)
    started = time.perf_counter()
    with torch.no_grad():
        teacher = sampled_logprobs(trainer.phase.teacher)
        reference = sampled_logprobs(opd.reference) if opd.reference is not None else None
    trainer.teacher_seconds += time.perf_counter() - started
    loss, diagnostics = opd_loss(student, teacher, mask, reference_logprobs=reference, scale=opd.scale,
                                 sequence_advantages=batch.get("sequence_advantage"),
                                 reward_weight=opd.reward_weight, num_valid_tokens=num_valid_tokens)
    return loss, {"loss": loss.item(), "kd": diagnostics["reverse_kl"]}


def self_distill_examples(trainer, examples: list[Example], step: int, micro: int, rank: int,
                          timing: dict) -> tuple[list[Example], list[Example]]:
    """(student examples, teacher examples): the same completions (the student's samples with
    probability lmbda, else the data's) after the prompt, and after privileged context + prompt."""
    settings = trainer.phase.self_distill
    completed = student_samples(trainer, examples, step, micro, rank, timing, policy=settings.sampling)
    teacher_examples = []
    for original, example in zip(examples, completed):
        start = len(prompt_of(example))
        completion = example.input_ids[start:]
        prompt = settings.teacher_prompts[original.id]
        teacher_examples.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, original.id))
    return completed, teacher_examples


def self_distill_loss(trainer, batch: dict, num_valid_tokens: int) -> tuple[torch.Tensor, dict]:
    """The objective's divergence between the student on (prompt, y) and its privileged self on
    (context, prompt, y), over the tokens of y, plus the objective's CE on y."""
    from distill.losses import cross_entropy

    objective, settings = trainer.phase.objective, trainer.phase.self_distill
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logits = trainer.engine(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits[:, :-1, :trainer.vocab_size]
    started = time.perf_counter()
    with torch.no_grad():
        teacher = settings.snapshot if settings.snapshot is not None else trainer.model
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                 attention_mask=batch["teacher_attention_mask"]).logits[:, :-1, :trainer.vocab_size]
    trainer.teacher_seconds += time.perf_counter() - started
    teacher_mask = batch["teacher_labels"][:, 1:] != IGNORE_INDEX
    # Both sides hold the same completion tokens in the same order: align by position in y.
    kd = trainer.divergence(logits[mask], teacher_logits[teacher_mask], None, temperature=objective.temperature,
                            num_valid_tokens=num_valid_tokens, **trainer.loss_params)
    loss, parts = objective.kd_weight * kd, {"kd": kd.item()}
    if objective.ce_weight > 0:
        ce = cross_entropy(logits, labels, mask, num_valid_tokens=num_valid_tokens)
        loss, parts["ce"] = loss + objective.ce_weight * ce, ce.item()
    parts["loss"] = loss.item()
    return loss, parts
