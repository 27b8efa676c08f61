"""Resumable checkpoints written atomically: a crash mid-write never leaves a half checkpoint.

A checkpoint directory holds `model.safetensors`, `trainer.pt` (optimizer, scheduler, RNG
states) and `state.json` (step, data position, objective state). It is written to
`<name>.tmp`, then swapped in by renames, so the previous good checkpoint survives until the
new one is complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, state: dict) -> None:
    """Write model, optimizer, scheduler, RNG states and `state` to `directory` atomically."""
    directory = Path(directory)
    staging, previous = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # safetensors refuses shared storage (tied weights): store independent contiguous copies.
    tensors = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(staging / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
               staging / "trainer.pt")
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    _sync_directory(staging)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(staging, directory)
    shutil.rmtree(previous, ignore_errors=True)


def find_checkpoint(directory: Path) -> Path | None:
    """The last complete checkpoint, recovering from a crash between the two renames."""
    directory = Path(directory)
    if (directory / "state.json").is_file():
        return directory
    previous = directory.with_name(directory.name + ".old")
    if (previous / "state.json").is_file():
        os.replace(previous, directory)
        return directory
    return None


def load_checkpoint(directory: Path, *, model, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved `state`."""
    directory = Path(directory)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    trainer_state = torch.load(directory / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    restore_rng_states(trainer_state["rng"])
    return json.loads((directory / "state.json").read_text())


def _sync_directory(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
