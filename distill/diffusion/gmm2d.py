"""2-D Gaussian mixtures with exact densities, denoisers and scores: the toy task of diffusion distillation.

A mixture of K isotropic Gaussians of one std s in the plane,

    p_0(x) = sum_k w_k N(x; mu_k, s^2 I),

noised in the EDM convention (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): x_sigma = x_0 + sigma * eps with eps ~ N(0, I). The noised density is again a mixture,

    p_sigma(x) = sum_k w_k N(x; mu_k, v I),   v = s^2 + sigma^2,

so everything a diffusion teacher has to learn is known in closed form: the log density, the optimal
denoiser D(x, sigma) = E[x_0 | x_sigma = x] and the score grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2.
The mixture is therefore its own perfect many-step teacher, and what a few-step student loses (a mode, the
right share of a rare mode) is measurable exactly (distill.diffusion.metrics.mode_stats).

Conventions: x is [N, 2]; sigma is a number, a 0-dim / 1-element Tensor, or one level per point ([N] or
[N, 1]). Densities, denoisers and scores are computed in float64 (log-sum-exp over components, so tiny and
huge sigma and far-away points stay finite) and returned in the dtype of x (float32 at least).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianMixture2D"]


def _check_positive(name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """`value` is a finite real number > minimum (>= with inclusive); ValueError naming `name` otherwise."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _geometric_weights(num_modes: int, imbalance: float) -> Tensor:
    """w_k proportional to imbalance^(-k / (K - 1)): w_0 / w_{K-1} = imbalance, the rarest mode last."""
    if num_modes == 1:
        return torch.ones(1, dtype=torch.float64)
    exponents = -torch.arange(num_modes, dtype=torch.float64) / (num_modes - 1)
    weights = torch.tensor(imbalance, dtype=torch.float64).pow(exponents)
    return weights / weights.sum()


@dataclass(eq=False)
class GaussianMixture2D:
    """sum_k weights[k] N(means[k], std^2 I) in the plane, with exact log densities, denoisers and scores.

    means: [K, 2] mode centres; weights: [K] mixture weights, all > 0, summing to 1 (within 1e-6; they are
    renormalised); std: the std of every component (> 0). Both tensors are stored as float64 on the CPU.
    Build one with `ring` or `grid`, or directly from any means and weights.
    """

    means: Tensor
    weights: Tensor
    std: float

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64).cpu()
        if means.dim() != 2 or means.shape[1] != 2 or means.shape[0] < 1 or not torch.isfinite(means).all():
            raise ValueError(f"means must be a finite [K, 2] tensor (one row per mode, K >= 1), got shape "
                             f"{tuple(means.shape)}")
        weights = torch.as_tensor(self.weights, dtype=torch.float64).cpu()
        if weights.shape != (means.shape[0],):
            raise ValueError(f"weights must have shape ({means.shape[0]},), one per row of means, got "
                             f"{tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or not (weights > 0).all():
            raise ValueError("weights must all be finite and > 0 (drop a mode rather than give it weight 0)")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got {float(weights.sum()):.8g}: divide them by their sum")
        self.means, self.weights = means, weights / weights.sum()
        self.std = _check_positive("std", self.std)

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.05, imbalance: float = 1.0,
             seed: int | None = None) -> "GaussianMixture2D":
        """`num_modes` modes equally spaced on a circle of `radius` around the origin.

        Mode k sits at angle offset + 2 pi k / K, where offset = 0 (mode 0 on the +x axis) or, with a `seed`,
        a seeded uniform random angle (a rotated copy of the same ring). Weights are geometric in the index,
        w_k proportional to imbalance^(-k / (K - 1)): imbalance = w_0 / w_{K-1} >= 1 is the ratio of the most
        common to the rarest weight; mode 0 is the most common and mode K - 1 the rarest (rarest_mode).
        imbalance = 1 gives equal weights. The default (8 modes, radius 2, std 0.05) is the usual
        mode-collapse benchmark: modes 1.53 apart, 30 stds.
        """
        num_modes = _check_count("num_modes", num_modes)
        radius = _check_positive("radius", radius)
        imbalance = _check_positive("imbalance", imbalance, minimum=1.0, inclusive=True)
        offset = 0.0
        if seed is not None:
            generator = torch.Generator().manual_seed(_check_count("seed", seed, minimum=0))
            offset = 2 * math.pi * float(torch.rand((), generator=generator, dtype=torch.float64))
        angles = offset + 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(means, _geometric_weights(num_modes, imbalance), std)

    @classmethod
    def grid(cls, side: int = 5, spacing: float = 1.0, std: float = 0.05,
             imbalance: float = 1.0) -> "GaussianMixture2D":
        """side x side modes on a square grid of `spacing`, centred on the origin.

        Mode k = row * side + col sits at ((col - (side - 1) / 2) spacing, (row - (side - 1) / 2) spacing).
        Weights are geometric in k as in `ring`: mode 0 (bottom left) is the most common and mode
        side^2 - 1 (top right) the rarest, imbalance = their ratio (1 = equal weights).
        """
        side = _check_count("side", side)
        spacing = _check_positive("spacing", spacing)
        imbalance = _check_positive("imbalance", imbalance, minimum=1.0, inclusive=True)
        offsets = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
        rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
        means = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1)
        return cls(means, _geometric_weights(side * side, imbalance), std)

    # ---- exact facts ----------------------------------------------------------------------------

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def rarest_mode(self) -> int:
        """Index of the smallest weight (the last such index on ties: K - 1 for `ring` and `grid`)."""
        smallest = self.weights.min()
        return int(torch.nonzero(self.weights <= smallest * (1 + 1e-12)).max())

    @property
    def mean(self) -> Tensor:
        """E[x_0] = sum_k w_k mu_k, [2] float64 (0 for `grid` and for `ring` with imbalance 1, K >= 2)."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Cov[x_0] = s^2 I + sum_k w_k (mu_k - m)(mu_k - m)^T, [2, 2] float64, exact."""
        centred = self.means - self.mean
        return self.std ** 2 * torch.eye(2, dtype=torch.float64) + (centred.T * self.weights) @ centred

    @property
    def sigma_data(self) -> float:
        """The per-coordinate std of the data, sqrt(Tr Cov[x_0] / 2), exact: EDM's sigma_data.

        When the two coordinates have the same variance (`grid`; `ring` with imbalance 1 and K >= 3) this is
        exactly the std of each; otherwise it is their root mean square. It is taken around the mixture mean,
        which EDM's preconditioning assumes is 0 (true for `grid` and the balanced `ring`).
        """
        return math.sqrt(float(torch.trace(self.covariance)) / 2)

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """n exact samples [n, 2]: a mode k ~ Categorical(weights), then mu_k + std * N(0, I).
        `generator` (a CPU torch.Generator) makes them reproducible; drawn in float64, returned in `dtype`."""
        n = _check_count("n", n, minimum=0)
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[components] + self.std * noise).to(dtype)

    def labels_of(self, x: Tensor) -> Tensor:
        """Index of the nearest mode centre (Euclidean) of every row of x [N, 2]: [N] int64.
        With equal stds this is the most likely component up to the log-weight term (exact for equal weights)."""
        squared = self._squared_distances(self._check_x(x))
        return squared.argmin(dim=1)

    # ---- exact density, denoiser and score ------------------------------------------------------

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_sigma(x) = logsumexp_k [log w_k - ||x - mu_k||^2 / (2 v)] - log(2 pi v), v = std^2 + sigma^2.

        x [N, 2], sigma >= 0 (see the module docstring for its shapes); returns [N]. sigma = 0 is the clean data.
        """
        x64 = self._check_x(x)
        variance = self._variance(sigma, x64.shape[0])  # [N, 1] or [1, 1]
        logits = self._component_logits(x64, variance)
        log_density = torch.logsumexp(logits, dim=1) - torch.log(2 * math.pi * variance[:, 0])
        return log_density.to(self._out_dtype(x))

    def responsibilities(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """r_k(x) = P(component k | x_sigma = x) = softmax_k [log w_k - ||x - mu_k||^2 / (2 v)], [N, K]."""
        x64 = self._check_x(x)
        logits = self._component_logits(x64, self._variance(sigma, x64.shape[0]))
        return torch.softmax(logits, dim=1).to(self._out_dtype(x))

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The optimal denoiser D(x, sigma) = E[x_0 | x_sigma = x], [N, 2], exact.

            D(x, sigma) = sum_k r_k(x) (mu_k + s^2 / v (x - mu_k)),   v = s^2 + sigma^2,

        r_k the responsibilities under p_sigma (computed by log-sum-exp), s = std. Limits: D -> x as
        sigma -> 0 (every x is already clean), D -> the mixture mean as sigma -> infinity. sigma >= 0.
        This is the analytic teacher: the minimiser of E ||D(x_0 + sigma eps, sigma) - x_0||^2.
        """
        x64 = self._check_x(x)
        noise_variance = self._noise_variance(sigma, x64.shape[0])
        variance = self.std ** 2 + noise_variance
        posterior_mean = self._posterior_mode_mean(x64, variance)
        clean_share = self.std ** 2 / variance  # s^2 / v: how much of x is signal
        noise_share = noise_variance / variance  # sigma^2 / v directly: 1 - s^2 / v would cancel at small sigma
        return (clean_share * x64 + noise_share * posterior_mean).to(self._out_dtype(x))

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """grad_x log p_sigma(x) = sum_k r_k(x) (mu_k - x) / v, [N, 2], exact.

        For sigma > 0 this equals (D(x, sigma) - x) / sigma^2 (Tweedie's formula), but it is computed in the
        form above, which does not subtract two nearly equal numbers at small sigma and stays defined at
        sigma = 0 (the score of the clean mixture).
        """
        x64 = self._check_x(x)
        variance = self._variance(sigma, x64.shape[0])
        return ((self._posterior_mode_mean(x64, variance) - x64) / variance).to(self._out_dtype(x))

    # ---- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _out_dtype(x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    @staticmethod
    def _check_x(x: object) -> Tensor:
        """x is a floating [N, 2] Tensor; returned in float64."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2 or not x.is_floating_point():
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating point [N, 2] tensor of points, got {got} "
                             "(use x.reshape(-1, 2) for a single point)")
        return x.to(torch.float64)

    def _variance(self, sigma: object, num_points: int) -> Tensor:
        """v = std^2 + sigma^2 as float64 [N, 1] (one level per point) or [1, 1] (one level for all)."""
        return self.std ** 2 + self._noise_variance(sigma, num_points)

    @staticmethod
    def _noise_variance(sigma: object, num_points: int) -> Tensor:
        """sigma^2 as float64 [N, 1] or [1, 1], after checking sigma's shape and values."""
        if isinstance(sigma, Tensor):
            if sigma.numel() == 1:
                levels = sigma.reshape(1, 1)
            elif sigma.shape in ((num_points,), (num_points, 1)):
                levels = sigma.reshape(num_points, 1)
            else:
                raise ValueError(f"sigma has shape {tuple(sigma.shape)}: expected a number, one level for all "
                                 f"points, or one per point of x, shape ({num_points},) or ({num_points}, 1)")
            levels = levels.to(torch.float64)
            if not torch.isfinite(levels).all() or (levels < 0).any():
                raise ValueError("sigma must be finite and >= 0 (a noise std), got negative or non-finite values")
        else:
            levels = torch.tensor([[_check_positive("sigma", sigma, inclusive=True)]], dtype=torch.float64)
        return levels.square()

    def _squared_distances(self, x64: Tensor) -> Tensor:
        # Direct differences, not the ||x||^2 - 2<x, mu> + ||mu||^2 expansion: exact for far-away points.
        return (x64.unsqueeze(1) - self.means.to(x64.device)).square().sum(dim=2)  # [N, K]

    def _component_logits(self, x64: Tensor, variance: Tensor) -> Tensor:
        """log w_k - ||x - mu_k||^2 / (2 v), [N, K]; the shared -log(2 pi v) is left out."""
        return self.weights.to(x64.device).log() - self._squared_distances(x64) / (2 * variance)

    def _posterior_mode_mean(self, x64: Tensor, variance: Tensor) -> Tensor:
        """sum_k r_k(x) mu_k, [N, 2] float64."""
        responsibilities = torch.softmax(self._component_logits(x64, variance), dim=1)
        return responsibilities @ self.means.to(x64.device)
