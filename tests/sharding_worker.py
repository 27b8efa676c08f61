"""One process of the two-process FSDP2 check in tests/test_sharding.py (run under torchrun, CPU, gloo).

Each process builds the same tiny Llama student and teacher (seeded), keeps an unsharded copy of each as
the single-process reference, shards the originals with `distill.lm.sharding`, and checks:
- shards: every parameter of student and teacher holds half its rows on each process; the teacher is
  frozen (no gradients);
- fused loss: over 2 micro-batches per process, the global fused-path loss (KD + CE, several token
  chunks, padded vocabulary rows) and the gathered student gradients equal the reference computed on
  the whole global batch at once, also with gradient checkpointing and with tied embeddings; so does the
  clipped gradient norm;
- checkpoints: full state dicts of model and optimizer written by `distill.core.checkpoint` (rank 0) and
  loaded into a fresh sharded model + optimizer restore every shard exactly, and the next step is the
  same; `save_pretrained` of the gathered state reloads as the same model;
- sampling through the sharded student gives the reference's tokens; bf16 mixed precision runs.
Rank 0 prints `ok <check>` per check; any failure raises (non-zero exit).
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

torch.set_num_threads(1)

from transformers import AutoModelForCausalLM  # noqa: E402

from distill.core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from distill.lm.generate import sample  # noqa: E402
from distill.lm.models import make_accelerator, set_activation_checkpointing, tiny_llama_config  # noqa: E402
from distill.lm.sharding import (FullStateDict, clip_grad_norm, final_hidden_states, gathered, release,  # noqa: E402
                                 shard_causal_lm)
from distill.losses.fused import TeacherSignal, fused_linear_distillation  # noqa: E402

VOCAB, REAL_VOCAB = 64, 60  # 4 padded rows beyond the tokenizer's vocabulary, as same-family models have
ATOL = 1e-5  # fp32; the sharded and reference sums differ only in order
ROWS, MICRO, LENGTH = 2, 2, 12  # per process: 2 micro-batches of 2 sequences


def full_head_weight(head) -> torch.Tensor:
    """The head weight the fused loss reads: after the root's forward it must be the gathered parameter."""
    assert not isinstance(head.weight, DTensor), "the head weight is still sharded after the root's forward"
    return head.weight


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def build(seed: int, tied: bool, hidden: int = 32):
    torch.manual_seed(seed)
    config = tiny_llama_config(VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=2 * hidden)
    config.tie_word_embeddings = tied  # SmolLM-style: lm_head.weight is embed_tokens.weight
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def global_batch(world: int) -> dict:
    """world * MICRO * ROWS sequences with left prompts (no loss) and right padding."""
    generator = torch.Generator().manual_seed(123)
    count = world * MICRO * ROWS
    input_ids = torch.randint(3, REAL_VOCAB, (count, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(count):
        prompt, padding = 1 + row % 4, row % 3
        labels[row, :prompt] = -100
        if padding:
            input_ids[row, -padding:], attention_mask[row, -padding:], labels[row, -padding:] = 0, 0, -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def rows_of(batch: dict, rank: int, micro: int) -> dict:
    start = (micro * dist.get_world_size() + rank) * ROWS  # the trainer's order: micro-batch, then rank
    return {k: v[start:start + ROWS] for k, v in batch.items()}


def fused_loss(student, teacher, batch: dict, num_valid: int) -> torch.Tensor:
    """The fused path as the trainer runs it: teacher hidden + head under no_grad, then the student's."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, **inputs)[:, :-1]
        signal = TeacherSignal(hidden=teacher_hidden, weight=full_head_weight(teacher.lm_head))
    hidden = final_hidden_states(student, **inputs)[:, :-1]
    labels = batch["labels"][:, 1:]
    return fused_linear_distillation(hidden, full_head_weight(student.lm_head), signal, labels=labels,
                                     mask=labels != -100, loss="forward_kl", kd_weight=1.0, ce_weight=0.5,
                                     vocab_size=REAL_VOCAB, num_valid_tokens=num_valid, chunk_size=5)


def num_valid_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def check_shards(model, name: str) -> None:
    world = dist.get_world_size()
    for key, param in model.named_parameters():
        full, local = param.full_tensor().shape, param.to_local().shape
        assert local[0] * world == full[0] and local[1:] == full[1:], f"{name} {key}: {tuple(local)} of {tuple(full)}"


def train_step_and_compare(tied: bool, checkpointing: bool) -> tuple:
    """One accumulated step, sharded vs reference; returns (sharded student, sharded teacher, reference student)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    student, teacher = build(0, tied), build(1, tied, hidden=48)
    reference_student, reference_teacher = copy.deepcopy(student), copy.deepcopy(teacher).requires_grad_(False)
    shard_causal_lm(teacher, trainable=False)
    shard_causal_lm(student, trainable=True)
    if checkpointing:
        set_activation_checkpointing(student, True)
    student.train()
    check_shards(student, "student")
    check_shards(teacher, "teacher")
    for model in (student, teacher):  # one FSDP unit per decoder layer, and the root
        assert sum(isinstance(m, FSDPModule) for m in model.modules()) == model.config.num_hidden_layers + 1
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher must be frozen"
    if tied:
        assert student.lm_head.weight is student.model.embed_tokens.weight

    batch = global_batch(world)
    count = num_valid_tokens(batch)
    reference_loss = fused_loss(reference_student, reference_teacher, batch, count)
    reference_loss.backward()
    local_loss = torch.zeros(())
    for micro in range(MICRO):
        loss = fused_loss(student, teacher, rows_of(batch, rank, micro), count)
        (loss * world).backward()  # FSDP averages gradients over processes, as DDP does
        release(teacher)
        local_loss += loss.detach()
    dist.all_reduce(local_loss)
    assert torch.allclose(local_loss, reference_loss.detach(), atol=ATOL), (float(local_loss), float(reference_loss))
    reference_grads = dict(reference_student.named_parameters())
    for key, param in student.named_parameters():
        expected = reference_grads[key].grad
        assert param.grad is not None, key
        got = param.grad.full_tensor()
        assert torch.allclose(got, expected, atol=ATOL), f"{key}: max diff {float((got - expected).abs().max())}"
    assert all(p.grad is None for p in teacher.parameters())
    # The norm over shards is the reference's norm; clipping scales every shard alike.
    reference_norm = float(torch.nn.utils.clip_grad_norm_(reference_student.parameters(), 0.05))
    norm = clip_grad_norm(student.parameters(), 0.05)
    assert abs(norm - reference_norm) < ATOL, (norm, reference_norm)
    for key, param in student.named_parameters():
        assert torch.allclose(param.grad.full_tensor(), reference_grads[key].grad, atol=ATOL), f"clipped {key}"
    return student, teacher, reference_student


def check_checkpoint_round_trip(student, teacher, directory: Path) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    release(student)  # a no_grad forward (sampling) may have left the root's gathered parameters in place of its shards
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model_state, optimizer_state = FullStateDict(student).gather(), FullStateDict(student, optimizer).gather()
    if rank == 0:
        save_checkpoint(directory / "checkpoint", modules={"model": model_state},
                        optimizers={"optimizer": optimizer_state}, state={"step": 1})
        full = model_state.state_dict()
        assert full and all(t.device.type == "cpu" for t in full.values())
        student.save_pretrained(directory / "saved", state_dict=dict(full))  # it empties the dict it is given
    else:
        assert model_state.state_dict() == {}
    dist.barrier()

    fresh = shard_causal_lm(build(7, student.config.tie_word_embeddings), trainable=True).train()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    state = load_checkpoint(directory / "checkpoint", modules={"model": FullStateDict(fresh)},
                            optimizers={"optimizer": FullStateDict(fresh, fresh_optimizer)})
    assert state == {"step": 1}
    originals = dict(student.named_parameters())
    for key, param in fresh.named_parameters():
        assert torch.equal(param.to_local(), originals[key].to_local()), f"loaded {key}"
    by_name = {id(p): k for k, p in student.named_parameters()}
    expected_state = {by_name[id(p)]: s for p, s in optimizer.state.items()}
    fresh_names = {id(p): k for k, p in fresh.named_parameters()}
    assert len(fresh_optimizer.state) == len(expected_state)
    for param, values in fresh_optimizer.state.items():
        for field, value in values.items():
            expected = expected_state[fresh_names[id(param)]][field]
            value, expected = (v.to_local() if hasattr(v, "to_local") else v for v in (value, expected))
            assert torch.equal(value, expected), f"optimizer {fresh_names[id(param)]}.{field}"
    # The same next step from the original and the restored (same batch, same optimizer state).
    batch = rows_of(global_batch(world), rank, 0)
    count = num_valid_tokens(global_batch(world))
    for model, opt in ((student, optimizer), (fresh, fresh_optimizer)):
        (fused_loss(model, teacher, batch, count) * world).backward()
        release(teacher)
        opt.step()
    for key, param in fresh.named_parameters():
        assert torch.equal(param.to_local(), originals[key].to_local()), f"after a step {key}"
    if rank == 0:  # the save_pretrained directory is a plain transformers model with the gathered weights
        reloaded = AutoModelForCausalLM.from_pretrained(directory / "saved")
        for key, value in reloaded.state_dict().items():
            assert torch.equal(value, full[key]), f"save_pretrained {key}"


def check_sampling(student, reference_student) -> None:
    """Inside `gathered`, each process samples its own prompts for its own number of tokens (no lockstep:
    a process that stops early must not leave the other waiting in an all-gather), and the main process
    alone runs an evaluation forward; both give the reference's values."""
    rank = dist.get_rank()
    prompts, new_tokens = [[1, 5, 9], [1, 7]] if rank == 0 else [[1, 4]], 3 + 5 * rank
    draws, logits = [], []
    for model in (student, reference_student):
        with torch.no_grad(), gathered(model):
            draws.append(sample(model, prompts, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
                                temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(3 + rank),
                                vocab_size=REAL_VOCAB).sequences)
            if rank == 0:
                logits.append(model(input_ids=torch.tensor([[1, 5, 9, 11]])).logits)
    assert torch.equal(draws[0], draws[1]), draws
    if rank == 0:
        assert torch.allclose(logits[0], logits[1], atol=ATOL)


def check_bf16() -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    student, teacher = build(0, False), build(1, False, hidden=48)
    batch = global_batch(world)
    count = num_valid_tokens(batch)
    reference = fused_loss(copy.deepcopy(student), copy.deepcopy(teacher).requires_grad_(False), batch, count).detach()
    shard_causal_lm(student, trainable=True, mixed_precision=torch.bfloat16)
    shard_causal_lm(teacher, trainable=False, mixed_precision=torch.bfloat16)
    total = torch.zeros(())
    for micro in range(MICRO):
        loss = fused_loss(student, teacher, rows_of(batch, rank, micro), count)
        (loss * world).backward()
        release(teacher)
        total += loss.detach().float()
    dist.all_reduce(total)
    assert abs(float(total) - float(reference)) < 0.02 * abs(float(reference)), (float(total), float(reference))
    for key, param in student.named_parameters():  # shards and their gradients stay float32
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, key
        assert torch.isfinite(param.grad.to_local()).all(), key


def main() -> None:
    directory = Path(sys.argv[1])
    accelerator = make_accelerator()  # joins the torchrun processes into one gloo group, as runs do
    assert dist.is_initialized() and dist.get_world_size() == 2, accelerator.state
    started = time.perf_counter()
    fresh = build(0, False)
    reference = copy.deepcopy(fresh)
    check_sampling(shard_causal_lm(fresh, trainable=True), reference)
    log("ok sampling and main-process evaluation before any training step")
    student, teacher, reference_student = train_step_and_compare(tied=False, checkpointing=False)
    log("ok shards, fused loss and gradients")
    check_sampling(student, reference_student)
    log("ok sampling")
    check_checkpoint_round_trip(student, teacher, directory / "untied")
    log("ok checkpoint round trip")
    train_step_and_compare(tied=False, checkpointing=True)
    log("ok gradient checkpointing")
    student, teacher, _ = train_step_and_compare(tied=True, checkpointing=False)
    log("ok tied embeddings")
    check_checkpoint_round_trip(student, teacher, directory / "tied")
    log("ok tied checkpoint round trip")
    check_bf16()
    log("ok bf16 mixed precision")
    log(f"done in {time.perf_counter() - started:.1f} s")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as distill's CLI: no C++ static destructors (a gloo abort at exit on a loaded machine)


if __name__ == "__main__":
    main()
