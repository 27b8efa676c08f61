"""Resumable checkpoints, written atomically and without pickle.

A checkpoint directory holds one `<name>.safetensors` per module (`model.safetensors` for the
trained model), `trainer.safetensors` + `trainer.json` (optimizers, schedulers, random generators
and the global RNG states: their tensors, and a JSON skeleton that says where each tensor goes) and
`checksums.json` (the SHA-256 of every other file) and `state.json` (step, data position, anything the
trainer adds; written last, it marks the checkpoint complete). The directory is staged and swapped in
by renames (`core.io.staged_directory`), and the checkpoint it replaces is kept as `<phase>.previous`:
a resume verifies the checksums and, if the newest checkpoint is damaged, sets it aside as
`<phase>.damaged` and continues from the previous one with a warning. Loading never runs code from the
file (no `torch.load`, no pickle).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.core.errors import DistillError
from distill.core.io import previous_version, recover_directory, sha256_file, staged_directory

STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
# Testing aid: stop as if killed right after the checkpoint of this step (every family's trainer).
CRASH_AFTER_STEP_ENV = "DISTILL_CRASH_AFTER_STEP"
# With DISTILL_CRASH_KIND=exception the crash is an unexpected RuntimeError instead (the CLI's failure path).
CRASH_KIND_ENV = "DISTILL_CRASH_KIND"


# ---- state trees (optimizer / scheduler / RNG state) <-> tensors + JSON -------------------------------

def _encode(value, tensors: dict[str, torch.Tensor]):
    """A JSON-able skeleton of `value`, its tensors and arrays moved into `tensors` (by key)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__tuple__" if isinstance(value, tuple) else "__list__": [_encode(v, tensors) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(skeleton, tensors: dict[str, torch.Tensor]):
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return tensors[skeleton["__ndarray__"]].numpy()
    if "__dict__" in skeleton:
        return {k: _decode(v, tensors) for k, v in skeleton["__dict__"].items()}
    if "__items__" in skeleton:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in skeleton["__items__"]}
    if "__tuple__" in skeleton:
        return tuple(_decode(v, tensors) for v in skeleton["__tuple__"])
    return [_decode(v, tensors) for v in skeleton["__list__"]]


def rng_states() -> dict:
    """The global random states (Python, NumPy, torch; CUDA where present)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(directory: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict | None = None,
                    schedulers: dict | None = None, generators: dict[str, torch.Generator] | None = None,
                    state: dict | None = None) -> None:
    """Write everything a trainer needs to continue exactly where it stopped, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    trainer = {"optimizers": {k: _encode(v.state_dict(), tensors) for k, v in (optimizers or {}).items()},
               "schedulers": {k: _encode(v.state_dict(), tensors) for k, v in (schedulers or {}).items()},
               "generators": {k: _encode(v.get_state(), tensors) for k, v in (generators or {}).items()},
               "rng": _encode(rng_states(), tensors)}
    with staged_directory(directory, keep_previous=True) as staging:
        for name, module in modules.items():
            # safetensors refuses shared storage (tied weights): store independent contiguous copies.
            weights = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(staging / f"{name}.safetensors"))
        save_file(tensors, str(staging / "trainer.safetensors"))
        (staging / "trainer.json").write_text(json.dumps(trainer))
        (staging / STATE_FILE).write_text(json.dumps(state or {}, indent=1))
        sums = {file.name: sha256_file(file) for file in sorted(staging.iterdir())}
        (staging / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1))  # the swap follows: a complete checkpoint


def checkpoint_problem(directory: str | Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing file, a checksum that differs), None if it is whole."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    sums_file = directory / CHECKSUMS_FILE
    if not sums_file.is_file():
        return None  # written before checkpoints had checksums: nothing to verify against
    try:
        sums = json.loads(sums_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{CHECKSUMS_FILE} is not valid JSON"
    if not isinstance(sums, dict) or STATE_FILE not in sums:
        return f"{CHECKSUMS_FILE} does not list the checkpoint's files"
    for name, expected in sums.items():
        file = directory / name
        if Path(name).name != name or not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its checksum"
    return None


def find_checkpoint(directory: str | Path) -> Path | None:
    """The last good checkpoint in `directory` (None if there is none yet): recovered from a crash between the
    two renames, and verified; a damaged one is set aside as `<name>.damaged` (with a warning) and the
    previous one, if whole, takes its place."""
    directory = Path(directory)
    found = recover_directory(directory, STATE_FILE)
    if found is not None and (found / "trainer.pt").exists():
        raise DistillError(f"`{found}` was written by an earlier distill (pickled trainer state), which this "
                           "version does not load", field="--resume", fix="run again with --overwrite")
    if found is None:
        return None
    problem = checkpoint_problem(found)
    if problem is None:
        return found
    previous = previous_version(directory)
    fallback = checkpoint_problem(previous) if previous.is_dir() else "there is none"
    if fallback is not None:
        raise DistillError(f"the checkpoint `{found}` is damaged ({problem}) and the previous one is not usable "
                           f"either ({fallback})", field="--resume",
                           fix="start the run again with --overwrite (the damaged checkpoint stays for inspection "
                               "until then)")
    damaged = directory.with_name(directory.name + ".damaged")
    shutil.rmtree(damaged, ignore_errors=True)
    os.replace(directory, damaged)
    os.replace(previous, directory)
    step = json.loads((directory / STATE_FILE).read_text()).get("step")
    warnings.warn(f"the newest checkpoint in `{directory}` is damaged ({problem}); it is kept as `{damaged}` and "
                  f"the run continues from the previous checkpoint (step {step})", stacklevel=2)
    return directory


def load_checkpoint(directory: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict | None = None,
                    schedulers: dict | None = None, generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore everything `save_checkpoint` wrote into the given objects; return the saved `state`."""
    directory = Path(directory)
    for name, module in modules.items():
        module.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
    tensors = load_file(str(directory / "trainer.safetensors"))
    trainer = json.loads((directory / "trainer.json").read_text())
    for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, target in (objects or {}).items():
            target.load_state_dict(_decode(trainer[kind][name], tensors))
    for name, generator in (generators or {}).items():
        generator.set_state(_decode(trainer["generators"][name], tensors))
    restore_rng_states(_decode(trainer["rng"], tensors))
    return json.loads((directory / STATE_FILE).read_text())


def simulate_crash_after(step: int) -> None:
    """Testing aid: raise SystemExit as if killed, when `step` is the one named in DISTILL_CRASH_AFTER_STEP
    (a RuntimeError, an unexpected failure, with DISTILL_CRASH_KIND=exception). Trainers call it right after
    writing a checkpoint."""
    if step == int(os.environ.get(CRASH_AFTER_STEP_ENV, "0") or 0):
        if os.environ.get(CRASH_KIND_ENV) == "exception":
            raise RuntimeError(f"{CRASH_AFTER_STEP_ENV}={step}: simulated failure after the checkpoint")
        raise SystemExit(f"{CRASH_AFTER_STEP_ENV}={step}: simulated crash after the checkpoint")
