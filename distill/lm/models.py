"""Teacher and student models: load from a directory / hub id / built-in checkpoint, or build a
student from the teacher's config with overrides; check that both speak the same vocabulary."""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from distill.core.assets import builtin_model
from distill.core.errors import DistillError
from distill.core.io import staged_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Seconds a process of a multi-process run waits in a collective for a peer before failing (default: torch's,
# 30 minutes). A peer that dies is noticed at once (its connections close); this bounds a peer that hangs.
COLLECTIVE_TIMEOUT_ENV = "DISTILL_COLLECTIVE_TIMEOUT"


def make_accelerator():
    """The accelerate Accelerator runs use. Without a GPU, plain Accelerator() under `accelerate launch
    --multi_gpu` gives independent world-size-1 processes (measured); cpu=True joins them into one gloo
    process group."""
    import datetime

    from accelerate import Accelerator, InitProcessGroupKwargs

    handlers = []
    if os.environ.get(COLLECTIVE_TIMEOUT_ENV):  # a hung (not dead) peer: the others give up after this long
        seconds = float(os.environ[COLLECTIVE_TIMEOUT_ENV])
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=seconds)))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)


def quiet_transformers() -> None:
    """Our own progress bar is the one to watch: no per-load / per-save bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, intermediate_size: int | None = None,
                      max_position_embeddings: int = 256, **overrides) -> LlamaConfig:
    """A Llama-style config for built-in tasks (no dropout, untied head)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)


def resolve_model_path(path: str, field: str) -> str:
    """`builtin:oracle-teacher` -> the shipped checkpoint; a local path must exist; else a hub id."""
    shipped = builtin_model(path, "config.json", field)
    if shipped is not None:
        return str(shipped)
    local = Path(path).expanduser()
    if local.exists():
        if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
            base = _adapter_base(local / "adapter_config.json")
            raise DistillError(f"`{path}` is a LoRA/PEFT adapter, not a model: it needs its base model"
                               + (f" (`{base}`)" if base else ""), field=field,
                               fix="give the base model's directory as the path (and train new adapters with "
                                   "student.lora), or merge the adapter into its base first (peft's "
                                   "merge_and_unload, then save_pretrained) and give that directory")
        if not (local / "config.json").is_file():
            raise DistillError(f"`{path}` has no config.json, so it is not a saved transformers model",
                               field=field, fix="point at a directory written by save_pretrained")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise DistillError(f"no model directory at `{path}`", field=field,
                           fix="check the path (relative paths start at the current directory)")
    return path  # a hub id: transformers fetches or finds it in the local cache


def _adapter_base(adapter_config: Path) -> str | None:
    import json

    try:
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _from_pretrained(loader, what: str, path: str, field: str, trust_remote_code: bool = False, **options):
    """`loader.from_pretrained` with load failures turned into a DistillError naming `field`; a model that
    needs its repository's own code is refused unless `<role>.trust_remote_code` allows it."""
    location = resolve_model_path(path, field)
    trust_field = f"{field.split('.')[0]}.trust_remote_code"
    try:
        return loader.from_pretrained(location, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise DistillError(f"`{path}` needs its repository's own Python code to load (custom model code, "
                               "`auto_map` in its config)", field=trust_field,
                               fix=f"set {trust_field}: true if you trust that code, or use a model transformers "
                                   "ships") from None
        raise DistillError(f"could not load {what} from `{path}`: {str(error).splitlines()[0]}", field=field,
                           fix="give a directory written by save_pretrained, or a hub id that is in the local "
                               "cache (this machine may be offline)") from None


def load_tokenizer(path: str, field: str, trust_remote_code: bool = False):
    """The tokenizer at a local directory, hub id or `builtin:` name. One without a pad token (Llama-style)
    pads with its end-of-sequence token: padding is masked out of attention and loss, so any real token
    serves, and no embedding row is added."""
    tokenizer = _from_pretrained(AutoTokenizer, "a tokenizer", path, field, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise DistillError(f"the tokenizer at `{path}` has no pad, end-of-sequence, unknown or BOS token to "
                               "pad batches with", field=field,
                               fix="set a pad token (tokenizer.pad_token = ...; save_pretrained) and point here")
        tokenizer.pad_token = fallback
    return tokenizer


def load_config(path: str, field: str, trust_remote_code: bool = False):
    """The model config at a local directory, hub id or `builtin:` name."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, "a model config", path, field, trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, field: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The causal LM at a local directory, hub id or `builtin:` name, in `dtype`."""
    return _from_pretrained(AutoModelForCausalLM, "a causal LM", path, field, trust_remote_code=trust_remote_code,
                            dtype=dtype)


def build_student(teacher, overrides: dict, init_from_teacher_layers: list[int] | None, seed: int,
                  dtype: torch.dtype = torch.float32):
    """A student with the teacher's config plus `overrides`, randomly initialised (seeded), and
    optionally with chosen teacher layers, embeddings, final norm and head copied in."""
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise DistillError(f"`{key}` is not a field of the teacher's {type(config).__name__}",
                               field=f"student.config.{key}", fix="use a field of the teacher's config.json")
        setattr(config, key, value)
    _keep_derived_sizes_consistent(teacher.config, config, overrides)
    if "num_hidden_layers" in overrides and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    torch.manual_seed(seed)
    try:
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, AssertionError, RuntimeError) as error:
        raise DistillError(f"cannot build the student: {error}", field="student.config",
                           fix="check that sizes are consistent (hidden_size divisible by num_attention_heads)") from None
    try:  # some inconsistent sizes build fine and fail only in forward (e.g. odd head_dim with RoPE)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            student(input_ids=torch.zeros((1, 2), dtype=torch.long))
    except (ValueError, AssertionError, RuntimeError, IndexError) as error:
        raise DistillError(f"the student built from these sizes does not run: {str(error).splitlines()[0]}",
                           field="student.config",
                           fix="check that sizes are consistent (hidden_size divisible by num_attention_heads "
                               "into an even head_dim, heads divisible by num_key_value_heads)") from None
    if init_from_teacher_layers is not None:
        copy_teacher_layers(teacher, student, init_from_teacher_layers)
    if getattr(teacher, "generation_config", None) is not None:  # eos ids, sampling defaults travel along
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(dtype)


def _keep_derived_sizes_consistent(teacher_config, config, overrides: dict) -> None:
    """Sizes the teacher derived from others (head_dim, kv heads) follow the overrides unless set."""
    heads = getattr(config, "num_attention_heads", None)
    teacher_heads = getattr(teacher_config, "num_attention_heads", None)
    if heads and "head_dim" not in overrides and getattr(teacher_config, "head_dim", None) == (
            teacher_config.hidden_size // teacher_heads):
        config.head_dim = config.hidden_size // heads
    if heads and "num_key_value_heads" not in overrides and getattr(teacher_config, "num_key_value_heads", None) == teacher_heads:
        config.num_key_value_heads = heads


def copy_teacher_layers(teacher, student, layer_indices: list[int]) -> None:
    """Student layer i <- teacher layer layer_indices[i]; embeddings, final norm and head copied too."""
    field = "student.init_from_teacher_layers"
    if teacher.config.hidden_size != student.config.hidden_size:
        raise DistillError("copying layers needs the same hidden_size in teacher and student", field=field,
                           fix="drop init_from_teacher_layers or keep the teacher's hidden_size")
    teacher_layers, student_layers = _decoder_layers(teacher), _decoder_layers(student)
    if len(layer_indices) != len(student_layers):
        raise DistillError(f"{len(layer_indices)} layers given for a student of {len(student_layers)}",
                           field=field, fix="give one teacher layer index per student layer")
    bad = [i for i in layer_indices if not 0 <= i < len(teacher_layers)]
    if bad:
        raise DistillError(f"teacher has layers 0..{len(teacher_layers) - 1}, not {bad}", field=field,
                           fix="use indices inside the teacher")
    for student_index, teacher_index in enumerate(layer_indices):  # check all before copying any
        source, target = teacher_layers[teacher_index].state_dict(), student_layers[student_index].state_dict()
        mismatched = [f"{name} {tuple(source[name].shape)} vs {tuple(tensor.shape)}"
                      for name, tensor in target.items() if name in source and source[name].shape != tensor.shape]
        if mismatched:
            raise DistillError(f"teacher layer {teacher_index} does not fit student layer {student_index}: "
                               f"{'; '.join(mismatched[:3])}", field=field,
                               fix="keep the teacher's layer sizes (e.g. intermediate_size, heads) when copying layers")
    teacher_state = teacher.state_dict()
    # Copy everything whose name and shape match (embeddings, norms, head), then the chosen layers.
    student_state = student.state_dict()
    for name, tensor in student_state.items():
        if ".layers." not in name and name in teacher_state and teacher_state[name].shape == tensor.shape:
            tensor.copy_(teacher_state[name])
    for student_index, teacher_index in enumerate(layer_indices):
        student_layers[student_index].load_state_dict(teacher_layers[teacher_index].state_dict())


def _decoder_layers(model):
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise DistillError(f"{type(model).__name__} has no `layers`/`h` list to copy from",
                           field="student.init_from_teacher_layers", fix="drop init_from_teacher_layers")
    return layers


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher, student) -> int:
    """The number of real vocabulary entries both models are compared over.

    Same-family models may pad the embedding matrix differently (e.g. 152064 vs 151936 rows for
    one tokenizer); logits are compared over the tokenizer's real vocabulary only."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise DistillError("teacher and student use different tokenizers", field="student.path",
                           fix="cross-tokenizer KD is not available yet: use a student of the teacher's "
                               "family, or build one from the teacher's config with `student.config`")
    vocab_size = len(teacher_tokenizer)
    for name, model in (("teacher", teacher), ("student", student)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise DistillError(f"the {name} has {rows} output rows for a tokenizer of {vocab_size} tokens",
                               field=f"{name}.path", fix="resize the model's embeddings to the tokenizer")
    return vocab_size




# ---- LoRA students (peft) --------------------------------------------------------------------------

ADAPTER_DIR = "adapter"  # inside a saved student: the LoRA adapter its merged weights came from


def is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")


def transformers_model(model):
    """The transformers model inside a peft model (its LoRA layers are injected in place, so it computes
    the adapted function), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def set_activation_checkpointing(model, enabled: bool) -> None:
    """transformers' own activation (gradient) checkpointing of each decoder layer, non-reentrant (works
    with frozen inputs, LoRA, DDP and FSDP); the name changed in transformers 5.x."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def linear_module_names(model) -> list[str]:
    """Names (last component) of the model's linear layers, the output head excluded: LoRA's targets."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head and name})


def apply_lora(model, spec, seed: int):
    """`model` wrapped by peft with LoRA adapters of `spec` (r, alpha, dropout, target_modules); only the
    adapters train. Adapter init is seeded (B starts at zero, so the adapted model equals the base)."""
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    if targets != "all-linear":
        names = linear_module_names(model)
        missing = [name for name in targets if name not in names]
        if missing:
            raise DistillError(f"the student has no linear layer named {', '.join(missing)}", field=(
                "student.lora.target_modules"), fix=f"use names of its linear layers: {', '.join(names)} "
                                                    "(or all-linear)")
    torch.manual_seed(seed)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_model(model, tokenizer, directory: Path, state_dict: dict | None = None):
    """`save_pretrained` of the model and its tokenizer into `directory`, atomically (staged, fsynced,
    renamed): a crash never leaves a half-written model under the final name. A LoRA student saves its
    adapter under `adapter/` and the merged model beside it (what AutoModelForCausalLM loads); the merged
    model is returned (for a plain model, the model itself). `state_dict`: the full weights of a sharded
    model (distill/lm/sharding.py gather_full_state)."""
    with staged_directory(directory) as staging:
        if is_peft(model):
            model.save_pretrained(staging / ADAPTER_DIR)
            model = model.merge_and_unload()
        model.save_pretrained(staging, **({"state_dict": dict(state_dict)} if state_dict is not None else {}))
        tokenizer.save_pretrained(staging)
    return model


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
