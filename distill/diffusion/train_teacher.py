"""Teachers for the built-in diffusion tasks (`distill train-teacher builtin:gmm2d`, `builtin:digits
--diffusion`): an EDM denoiser trained on the task's data, saved with the task's description so a
recipe with other data is refused."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from distill.diffusion.data import diffusion_task
from distill.diffusion.models import build_denoiser, save_denoiser
from distill.core.errors import DistillError
from distill.diffusion.trainer import train_denoiser

SHAPES = {"gmm2d": ("mlp", {"hidden": 128, "layers": 3}), "digits": ("conv", {"channels": 64, "blocks": 4})}
# Updates of the shipped teachers. digits keeps an EMA of its weights (decay 0.999). A 32-channel, 3-block
# denoiser reached Frechet distance 21.2 at 64 Euler steps without EMA, 21.5 with it; 64 channels, 4 blocks,
# EMA: 11.7.
DEFAULT_STEPS = {"gmm2d": 4000, "digits": 6000}
EMA_DECAY = {"gmm2d": None, "digits": 0.999}
DEFAULT_MIXTURE = {"modes": 8, "imbalance": 10.0, "radius": 2.0, "std": 0.05}


def train_diffusion_teacher(task: str, out: str | Path, *, steps: int | None = None, batch_size: int = 256,
                            lr: float = 2e-3, seed: int = 0, threads: int | None = 1, overwrite: bool = False) -> dict:
    """Train the task's denoiser (gmm2d: the default imbalanced 8-mode ring) and save it; return a summary.
    steps: default DEFAULT_STEPS[task], what the shipped teachers were trained with."""
    if task not in SHAPES:
        raise DistillError(f"no built-in diffusion task `{task}`", field="TASK", fix="use builtin:gmm2d or builtin:digits")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DistillError(f"`{out}` is not empty", field="--out", fix="pass --overwrite or choose another directory")
    if threads:
        torch.set_num_threads(threads)
    steps = steps or DEFAULT_STEPS[task]
    started = time.perf_counter()
    data = diffusion_task(task, **(DEFAULT_MIXTURE if task == "gmm2d" else {}))
    arch, options = SHAPES[task]
    model = build_denoiser(arch, data.data_shape, data.sigma_data, options, seed=seed)
    train_denoiser(model, data.sample, steps=steps, batch_size=batch_size, lr=lr, ema_decay=EMA_DECAY[task], seed=seed)
    extra = {"task": task, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             **({"ema_decay": EMA_DECAY[task]} if EMA_DECAY[task] else {}),
             **({"mixture": DEFAULT_MIXTURE} if task == "gmm2d" else {})}
    save_denoiser(model, out, extra)
    return {"task": task, "out": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}
