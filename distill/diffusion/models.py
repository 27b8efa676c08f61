"""Small denoisers for the built-in diffusion tasks, EDM-preconditioned (Karras et al. 2022):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

so the raw network F sees unit-variance inputs and targets at every noise level. Every model here is a
denoiser `model(x [N, ...], sigma [N]) -> [N, ...]`: teachers, fake-score networks, consistency and
progressive students, and one-step generators (a denoiser evaluated at sigma_max) all share it, which is
what lets students start from the teacher's weights.

A saved denoiser is a directory with `model.safetensors` and `denoiser.json` (architecture, options,
data shape, sigma_data).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.core.assets import builtin_model
from distill.core.errors import DistillError
from distill.core.io import staged_directory
from distill.losses.diffusion import edm_preconditioning

CONFIG_FILE = "denoiser.json"


class NoiseEmbedding(nn.Module):
    """Fourier features of c_noise = ln(sigma) / 4 at geometric frequencies, then a small MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(64), width // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.frequencies[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class _Preconditioned(nn.Module):
    sigma_data: float

    def sigma_per_example(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """sigma (a number or [N]) as one level per example of x, [N], in x's dtype."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma.reshape(x.shape[0])

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = self.sigma_per_example(x, sigma)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        shape = (-1,) + (1,) * (x.dim() - 1)
        raw = self.network(x * c_in.reshape(shape), c_noise)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * raw


class MLPDenoiser(_Preconditioned):
    """For vector data [N, dim] (gmm2d): `layers` SiLU layers of width `hidden`, the noise embedding added
    to every hidden layer."""

    def __init__(self, data_shape: tuple[int, ...], sigma_data: float, hidden: int = 128, layers: int = 3):
        super().__init__()
        if len(data_shape) != 1:
            raise DistillError(f"an MLP denoiser takes vectors, got data shape {tuple(data_shape)}",
                               field="student.arch", fix="use arch: conv for images")
        self.sigma_data = float(sigma_data)
        self.embed = NoiseEmbedding(hidden)
        self.inp = nn.Linear(data_shape[0], hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.out = nn.Linear(hidden, data_shape[0])
        self.act = nn.SiLU()

    def network(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        embedding = self.embed(c_noise)
        h = self.act(self.inp(x) + embedding)
        for layer in self.hidden:
            h = self.act(layer(h) + embedding)
        return self.out(h)


class ConvDenoiser(_Preconditioned):
    """For small images [N, C, H, W] (digits 8x8): 3x3 convs at full resolution with GroupNorm + SiLU, the
    noise embedding as a per-channel shift in every block, a residual connection per block."""

    def __init__(self, data_shape: tuple[int, ...], sigma_data: float, channels: int = 64, blocks: int = 4):
        super().__init__()
        if len(data_shape) != 3:
            raise DistillError(f"a conv denoiser takes images [C, H, W], got data shape {tuple(data_shape)}",
                               field="student.arch", fix="use arch: mlp for vectors")
        self.sigma_data = float(sigma_data)
        self.embed = NoiseEmbedding(channels)
        self.inp = nn.Conv2d(data_shape[0], channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.GroupNorm(8, channels) for _ in range(blocks))
        self.shifts = nn.ModuleList(nn.Linear(channels, channels) for _ in range(blocks))
        self.out = nn.Conv2d(channels, data_shape[0], 3, padding=1)
        self.act = nn.SiLU()

    def network(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        embedding = self.embed(c_noise)
        h = self.inp(x)
        for conv, norm, shift in zip(self.blocks, self.norms, self.shifts):
            h = h + conv(self.act(norm(h) + shift(embedding)[:, :, None, None]))
        return self.out(self.act(h))


ARCHITECTURES = {"mlp": MLPDenoiser, "conv": ConvDenoiser}


def build_denoiser(arch: str, data_shape, sigma_data: float, options: dict | None = None, *, seed: int | None = None,
                   field: str = "student.arch") -> nn.Module:
    """A fresh denoiser of a built-in architecture (`mlp` for vectors, `conv` for images)."""
    if arch not in ARCHITECTURES:
        raise DistillError(f"no denoiser architecture `{arch}`", field=field, fix=f"use one of: {', '.join(ARCHITECTURES)}")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = ARCHITECTURES[arch](tuple(data_shape), sigma_data, **(options or {}))
    except TypeError as error:
        raise DistillError(f"bad options for denoiser `{arch}`: {error}", field=field.rsplit(".", 1)[0] + ".options",
                           fix="see distill/diffusion/models.py") from None
    model.distill_describe = {"arch": arch, "data_shape": list(data_shape), "sigma_data": float(sigma_data),
                              "options": dict(options or {})}
    return model


def save_denoiser(model: nn.Module, directory: str | Path, extra: dict | None = None) -> None:
    """model.safetensors + denoiser.json, written atomically (core.io.staged_directory)."""
    with staged_directory(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(staging / "model.safetensors"))
        (staging / CONFIG_FILE).write_text(json.dumps({**model.distill_describe, **(extra or {})}, indent=1))


def load_denoiser(path: str, field: str) -> tuple[nn.Module, dict]:
    """(denoiser in eval mode, its denoiser.json) from a directory or `builtin:<task>-teacher`."""
    name = path.removeprefix("builtin:")
    directory = builtin_model(path, CONFIG_FILE, field, train_command="builtin:digits --family diffusion"
                              if name == "digits-denoiser" else None) or Path(path).expanduser()
    if not (directory / CONFIG_FILE).is_file():
        raise DistillError(f"no saved denoiser at `{path}`", field=field,
                           fix="point at a directory written by distill (denoiser.json)")
    config = json.loads((directory / CONFIG_FILE).read_text())
    model = build_denoiser(config["arch"], config["data_shape"], config["sigma_data"], config["options"], field=field)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval(), config
