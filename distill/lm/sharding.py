"""FSDP2 sharding of causal LMs (teacher and student), on CPU/gloo and on GPUs/NCCL alike.

`shard_causal_lm` applies `fully_shard` (FSDP2: every parameter becomes a DTensor holding 1/world of its
rows on each process) to each decoder layer, then to the causal LM itself, the root, whose group holds
what is left: the embeddings, the final norm and the head (tied or not: a tied head is the embedding
parameter, one FSDP parameter). The process group is the default one that `accelerate launch` / torchrun
initialised; accelerate's own FSDP plugin is not used (under `Accelerator(cpu=True)` it does not shard).

The fused loss and the sharded head. The fused path (distill/losses/fused.py) runs the model up to its
final hidden states and applies `head.weight` chunk by chunk outside any module's forward. Under FSDP:
- the hidden-state forward must run through the root's FSDP hooks (they all-gather the root group), so it
  is a registered FSDP forward method of the root (`final_hidden_states` below), not a direct call of the
  base model, whose embeddings would still be sharded;
- the root is sharded with reshard_after_forward=False (FSDP2's own default for the root), so after that
  forward `head.weight` *is* the unsharded (full) parameter, until the backward has run (student) or
  `reshard` is called (teacher, which has no backward). The loss reads it as on one process; its
  gradient lands on the unsharded parameter and FSDP's end-of-backward callback reduce-scatters it into
  the shard's `.grad`, averaged over processes (like DDP), with the embedding's share when tied.
  Cost: one all-gather of the head per micro-batch (with the embeddings, which FSDP gathers anyway) and
  one reduce-scatter of its gradient; memory: the full head (student's and teacher's) from the forward to
  the end of the backward, as on one process.
  Measured against the alternatives (2 CPU processes, gloo, V=32768, H=256, 1024 tokens per process,
  4 token chunks, forward KL + CE, same chunk kernel for all three; machine shared, so relative):
  gathering the head again per token chunk was 15-20 % slower per step (an all-gather + reduce-scatter of
  V x H per chunk instead of per micro-batch; gloo: ~27 ms + ~36 ms each at that size) and its peak memory
  was no lower (each chunk still needs the full head and a full-size gradient); a vocabulary-parallel loss
  (all-gather the hidden states, each process its own vocabulary rows, all-reduce max / sum-exp per
  token) moves far less (N x H instead of V x H: ~1 ms vs ~60 ms here) but needs every divergence
  rewritten in vocabulary-parallel form, and for a tied head the embeddings are gathered anyway.

Checkpoints: `gather_full_state` / `load_full_state` move a sharded model's or optimizer's state to and
from a plain full state dict (parameter names as keys, also for the optimizer), so a checkpoint written
under FSDP is plain safetensors + JSON; they work on unsharded models too, so one format serves both.
`FullStateDict` lets `distill.core.checkpoint` write and read one. Every process must call the gathering
and loading functions (they are collectives); only the main process writes.

Needs torch >= 2.6 (public `torch.distributed.fsdp.fully_shard`, `get_total_norm`); import this module
only when sharding (torch builds without distributed support cannot import it).
"""
from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

HIDDEN_METHOD = "distill_final_hidden_states"
# Full (unsharded) state dicts, gathered on CPU; with cpu_offload only rank 0 keeps them (others get {}).
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes it names in `_no_split_modules` (what
    transformers and accelerate shard or place one by one), else `<base>.layers` / `<base>.h`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    inner = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
    layers = [layer for layer in layers if id(layer) not in inner]  # the outermost only: FSDP units don't nest here
    if layers:
        return layers
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    found = getattr(base, "layers", None) or getattr(base, "h", None)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(found)


def _base_hidden_states(model, input_ids, attention_mask, position_ids=None):
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).last_hidden_state


def sharding_applies(sharding: str, world_size: int) -> bool:
    """FSDP is used: asked for (train.sharding: fsdp) and more than one process to shard across."""
    return sharding == "fsdp" and world_size > 1


def shard_causal_lm(model: nn.Module, *, trainable: bool, mixed_precision: torch.dtype | None = None,
                    mesh=None) -> nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (default: every process of the default group) and
    return it.

    trainable=False (a teacher): eval mode, requires_grad off before sharding, so it has no gradients
    and no optimizer state; run it under torch.no_grad. trainable=True (the student): build the
    optimizer from `model.parameters()` *after* this call (they are the sharded DTensors).
    `mixed_precision` (e.g. torch.bfloat16): parameters are all-gathered and computed in that dtype while
    the shards (and optimizer state) stay in theirs, and gradients are reduced in float32.
    Activation checkpointing (distill.lm.models.set_activation_checkpointing): before or after.
    Sampling and evaluation: inside `gathered(model)`."""
    if not trainable:
        model.eval().requires_grad_(False)
    policy = MixedPrecisionPolicy()
    if mixed_precision is not None:
        policy = MixedPrecisionPolicy(param_dtype=mixed_precision,
                                      reduce_dtype=torch.float32 if trainable else None)
    for layer in decoder_layers(model):
        # Layers are freed right after their forward and gathered again for backward.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root keeps its group (embeddings, norm, head) gathered from forward to backward: the fused loss
    # reads the full head weight after the forward (see the module docstring).
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    setattr(model, HIDDEN_METHOD, types.MethodType(_base_hidden_states, model))
    register_fsdp_forward_method(model, HIDDEN_METHOD)
    return model


def load_sharded_causal_lm(directory, config, *, dtype: torch.dtype, trainable: bool,
                           mixed_precision: torch.dtype | None = None, trust_remote_code: bool = False):
    """The causal LM saved in `directory`, sharded as `shard_causal_lm` shards it, without ever holding the
    whole model in one process: it is built on the meta device, sharded, then each process allocates its
    own rows only and reads just those rows from the safetensors files (memory-mapped slices). So a model
    larger than one process's memory loads across processes. Returns None when the checkpoint cannot be
    read this way (no safetensors files, or parameter names that differ from the files' keys); the caller
    then loads the whole model and shards it. A collective: every process calls it."""
    import json
    from pathlib import Path

    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
    else:
        return None
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (e.g. RoPE) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # (not done on the meta device by from_config)
    names = [name for name, _ in model.named_parameters()]  # tied parameters once
    if any(name not in weight_map for name in names):
        return None
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    shard_causal_lm(model, trainable=trainable, mixed_precision=mixed_precision)
    model.to_empty(device=torch.device("cpu") if not torch.cuda.is_available() else
                   torch.device("cuda", torch.cuda.current_device()))
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        handles = {}
        try:
            for name, parameter in model.named_parameters():
                local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
                if local.numel() == 0:
                    continue
                file = weight_map[name]
                if file not in handles:
                    handles[file] = safe_open(str(directory / file), framework="pt")
                rows = handles[file].get_slice(name)
                start = _global_offset(parameter)
                local.copy_(rows[start:start + local.shape[0]].to(local.dtype))
        finally:
            handles.clear()
    if not trainable:
        model.eval()
    return model


def _global_offset(parameter) -> int:
    """The first row (dim 0) of the full parameter that this process's shard holds."""
    if not isinstance(parameter, DTensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh, parameter.placements)
    return offset[0]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def on_device(model: nn.Module, device) -> nn.Module:
    """`model.to(device)`, except for a sharded model, which is on its device already (and whose `.to`
    would drop the gathered parameters of `gathered`)."""
    return model if isinstance(model, FSDPModule) else model.to(device)


def local_share(model: nn.Module) -> float:
    """The fraction of the model's parameter elements this process holds (1.0 unsharded, 1/N sharded)."""
    local = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        local += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return local / max(total, 1)


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The causal LM's final (normed) hidden states [B, T, H], sharded or not. Sharded, it runs as a
    forward of the FSDP root, so afterwards the head (`model.get_output_embeddings().weight`) is the full
    parameter until the backward (or `release`)."""
    method = getattr(model, HIDDEN_METHOD, None)
    if method is not None:
        return method(input_ids, attention_mask, position_ids)
    return _base_hidden_states(model, input_ids, attention_mask, position_ids)


def release(model: nn.Module) -> None:
    """Free a sharded model's gathered parameters now. The root's group stays gathered after a forward
    until a backward reshards it; a forward under no_grad (the teacher, eval, sampling) has no backward,
    so call this after the loss that used the teacher's head, and before anything that reads or writes
    the shards themselves (state dicts, building an optimizer). A no-op on an unsharded model."""
    if isinstance(model, FSDPModule):
        model.reshard()


@contextmanager
def gathered(model: nn.Module):
    """Every parameter of a sharded model gathered for the duration of the block, for forwards under
    no_grad that the processes do not run in step: sampling (one forward per new token, and processes stop
    at different lengths) and evaluation on the main process only. Entering is a collective (every
    process enters); inside, forwards do no communication; leaving frees the gathered copies (local).
    Costs the full model's memory on every process while inside. Unsharded models pass through."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:  # the same order on every process
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for module in modules:
            module.set_reshard_after_forward(module is not model, recurse=False)  # as shard_causal_lm set it
            module.reshard()


@contextmanager
def gathered_all(models):
    """`gathered` for several models at once (None entries skipped), under no_grad when any is sharded."""
    models = [m for m in models if m is not None]
    with ExitStack() as stack:
        if any(isinstance(m, FSDPModule) for m in models):
            stack.enter_context(torch.no_grad())
        for model in models:
            stack.enter_context(gathered(model))
        yield


def clip_grad_norm(parameters, max_norm: float | None) -> float:
    """The total gradient norm over every process's shards (as one process would compute it on the full
    gradients), clipping to `max_norm` when given. Works for sharded (DTensor) and plain gradients."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return 0.0
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    else:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ---- full state dicts (saving, resuming) -------------------------------------------------------------

def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The full state dict of a sharded `model` (or, given `optimizer`, of the optimizer: parameter names
    as keys), on CPU in the main process ({} elsewhere). A collective: every process calls it. For
    `save_pretrained(directory, state_dict=...)` on the main process, or a checkpoint."""
    release(model)  # after a no_grad forward the root's gathered parameters stand in for its shards
    if optimizer is None:
        return get_model_state_dict(model, options=GATHER)
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def load_full_state(model: nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None, *,
                    from_main: bool = False) -> None:
    """Load a full state dict (what `gather_full_state` made) into the sharded `model` (or its `optimizer`):
    each process keeps its own rows. A collective. With from_main=True only the main process needs to
    pass the state (the others pass {}) and it is broadcast; otherwise every process passes it."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_main)
    release(model)  # write into the shards, not into a gathered copy that the next forward would reuse
    if optimizer is None:
        set_model_state_dict(model, state, options=options)
    else:
        set_optimizer_state_dict(model, optimizer, state, options=options)


class FullStateDict:
    """A sharded model, or its optimizer, as `distill.core.checkpoint` sees it: `state_dict()` returns the
    state gathered by the last `gather()` (call `gather()` on every process, then save on the main one),
    and `load_state_dict(state)` loads a full state on every process (each process reads the checkpoint)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer, self.gathered = model, optimizer, None

    def gather(self) -> "FullStateDict":
        self.gathered = gather_full_state(self.model, self.optimizer)
        return self

    def state_dict(self) -> dict:
        if self.gathered is None:
            raise RuntimeError("call gather() on every process before state_dict()")
        return self.gathered

    def load_state_dict(self, state: dict) -> None:
        load_full_state(self.model, state, self.optimizer)
