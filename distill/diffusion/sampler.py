"""Deterministic samplers for the probability-flow ODE of a denoiser, in the EDM convention.

Conventions (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):

- noising is variance exploding: x_sigma = x_0 + sigma * eps, eps ~ N(0, I), no input scaling;
- a denoiser is any callable `denoiser(x [N, ...], sigma [N]) -> [N, ...]` estimating E[x_0 | x_sigma];
  its score is (D(x, sigma) - x) / sigma^2;
- the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma, integrated from sigma_max down to 0;
- a schedule `sigmas` is a strictly decreasing 1-D sequence of positive noise levels ending with one 0
  (karras_sigmas builds the EDM one); `steps` = len(sigmas) - 1;
- `sample_ode` takes UNIT-variance noise and scales it by sigmas[0] itself.

No `torch.no_grad` inside: a caller that backpropagates through a few student steps may; wrap calls
in `torch.no_grad()` for plain sampling.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["METHODS", "Denoiser", "few_step_sigmas", "function_evaluations", "karras_level", "karras_sigmas",
           "ode_step", "sample_ode"]

Denoiser = Callable[[Tensor, Tensor], Tensor]

# "ddim" is deterministic DDIM (eta = 0). In the VE / EDM parametrisation it is the same map as an
# Euler step (Karras et al. 2022, sec. 3 and App. B.2); it is kept as its own formula, so the two
# can be checked against each other.
METHODS = ("euler", "heun", "ddim")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _as_schedule(sigmas: Tensor | Sequence[float]) -> list[float]:
    """The schedule as Python floats, after checking it is strictly decreasing, positive, and ends with 0."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if values.dim() != 1 or values.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 noise levels (one step), got shape "
                         f"{tuple(values.shape)}: build one with karras_sigmas(steps)")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("sigmas must be finite")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end with 0 (the samplers integrate down to clean data), got last "
                         f"{values[-1].item():g}: append 0, or use ode_step for a partial integration")
    if not bool((values[:-1] > 0).all()):
        raise ValueError("sigmas must be > 0 except the final 0")
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing (from sigma_max to 0), got {values.tolist()}")
    return values.tolist()


def _per_example_sigma(name: str, sigma: float | Tensor, x: Tensor) -> Tensor:
    """sigma (a number, a 0-dim or an [N] tensor) as an [N] tensor in x's dtype and device."""
    if isinstance(sigma, Tensor):
        values = sigma.to(dtype=x.dtype, device=x.device)
    else:
        values = torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
    if values.dim() == 0:
        return values.expand(x.shape[0])
    if values.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a number or an [N] tensor with N = {x.shape[0]} (one per example), "
                         f"got shape {tuple(values.shape)}")
    return values


def _broadcastable(per_example: Tensor, x: Tensor) -> Tensor:
    """[N] -> [N, 1, ..., 1], so it multiplies x example by example."""
    return per_example.reshape(-1, *([1] * (x.dim() - 1)))


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    denoised = denoiser(x, sigma)
    if not isinstance(denoised, Tensor) or denoised.shape != x.shape:
        got = tuple(denoised.shape) if isinstance(denoised, Tensor) else type(denoised).__name__
        raise ValueError(f"denoiser must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
    return denoised


# ---------------------------------------------------------------------------------------------
# Schedule, step, sampler
# ---------------------------------------------------------------------------------------------

def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The EDM noise schedule, [steps + 1] float64, decreasing, last entry 0.

    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i = 0 .. steps - 1, then sigma_steps = 0 (Karras et al. 2022, eq. 5). steps == 1 gives
    [sigma_max, 0]: one jump from pure noise to the denoiser's estimate. Defaults are EDM's
    (sigma_min 0.002, sigma_max 80, rho 7). float64 so a float64 sampler loses nothing; the samplers
    cast the schedule to the dtype of x.
    """
    steps = _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    sigmas = karras_level(torch.linspace(0.0, 1.0, steps, dtype=torch.float64), sigma_min, sigma_max, rho)
    # The endpoints exactly as given (the power round trip is off by an ulp or so).
    sigmas[-1], sigmas[0] = sigma_min, sigma_max
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_level(ramp: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The noise level at a fraction `ramp` (0: sigma_max, 1: sigma_min; a tensor, any shape, fractions
    between grid points allowed) of Karras et al.'s ramp, linear in sigma^(1/rho):
    (sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. karras_sigmas evaluates it on an
    even grid; consistency distillation also between grid points."""
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def few_step_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """A schedule of `steps` steps that all count: the first `steps` levels of karras_sigmas(steps + 1),
    then 0. [steps + 1] float64.

    karras_sigmas(N) spends its last step going from sigma_min (0.002) to 0, which changes nothing, so its
    2 steps are one step in effect; at 1-8 steps that skews any comparison at equal steps. Here level i is
    (sigma_max^(1/rho) + i / steps * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < steps, so the
    schedules nest: few_step_sigmas(2 n)[::2] == few_step_sigmas(n), which progressive distillation needs
    (each student step is two steps of its teacher's grid). steps == 1 gives [sigma_max, 0]. As used for
    multistep consistency sampling (Song et al. 2023) and few-step comparisons.
    """
    steps = _check_steps(steps)
    return torch.cat([karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:steps], torch.zeros(1, dtype=torch.float64)])


def ode_step(denoiser: Denoiser, x: Tensor, sigma_from: float | Tensor, sigma_to: float | Tensor,
             method: str = "euler") -> Tensor:
    """One step of the probability-flow ODE from sigma_from down to sigma_to; returns x at sigma_to.

    With D = denoiser(x, sigma_from) and d = (x - D) / sigma_from (the ODE's slope dx/dsigma):
    - euler: x + (sigma_to - sigma_from) * d;
    - ddim:  D + sigma_to * (x - D) / sigma_from  (deterministic DDIM, eta = 0; equal to euler);
    - heun:  the euler point x_e, then x + (sigma_to - sigma_from) * (d + d_e) / 2 with
             d_e = (x_e - denoiser(x_e, sigma_to)) / sigma_to (Karras et al. 2022, Alg. 1, no churn);
             where sigma_to == 0 the correction is skipped (d_e is undefined there): the euler point.
    sigma_from / sigma_to: numbers or [N] tensors (one level per example, as consistency distillation's
    teacher step needs), with 0 <= sigma_to < sigma_from. Costs 1 denoiser call (heun: 2, unless every
    sigma_to is 0). Used by sample_ode and by consistency distillation.
    """
    _check_method(method)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: expected shape [N, ...]")
    sigma_from = _per_example_sigma("sigma_from", sigma_from, x)
    sigma_to = _per_example_sigma("sigma_to", sigma_to, x)
    if not bool((sigma_from > 0).all()):
        raise ValueError("sigma_from must be > 0 (the ODE's slope (x - D) / sigma is undefined at 0)")
    if not bool(((sigma_to >= 0) & (sigma_to < sigma_from)).all()):
        raise ValueError("sigma_to must satisfy 0 <= sigma_to < sigma_from: the samplers integrate towards clean data")
    denoised = _denoise(denoiser, x, sigma_from)
    ratio = _broadcastable(sigma_to / sigma_from, x)
    if method == "ddim":
        return denoised + ratio * (x - denoised)
    slope = (x - denoised) / _broadcastable(sigma_from, x)
    delta = _broadcastable(sigma_to - sigma_from, x)
    euler = x + delta * slope
    if method == "euler" or not bool((sigma_to > 0).any()):
        return euler
    # Heun's corrector. Examples already at sigma_to == 0 keep the euler point; they are evaluated at
    # sigma_from instead (any positive level) so a network taking log(sigma) never sees 0.
    final = sigma_to == 0
    safe_sigma_to = torch.where(final, sigma_from, sigma_to)
    corrected_slope = (euler - _denoise(denoiser, euler, safe_sigma_to)) / _broadcastable(safe_sigma_to, x)
    heun = x + delta * 0.5 * (slope + corrected_slope)
    return torch.where(_broadcastable(final, x), euler, heun)


def sample_ode(denoiser: Denoiser, noise: Tensor, sigmas: Tensor | Sequence[float], method: str = "euler", *,
               return_trajectory: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate the probability-flow ODE from sigmas[0] down to 0; returns x at sigma = 0.

    noise: UNIT-variance Gaussian noise [N, ...]; the sampler starts at x = noise * sigmas[0].
    sigmas: a schedule (see karras_sigmas): strictly decreasing, positive, last entry 0; its length - 1
    is the number of steps, and any number >= 1 works (1 step returns D(noise * sigma_max, sigma_max)).
    method: "euler" (1st order), "heun" (EDM Alg. 1, 2nd order, no correction on the last step to 0),
    "ddim" (deterministic DDIM, the same map as euler here); function_evaluations gives the cost.
    return_trajectory: also return the states at every level, [steps + 1, N, ...], first noise * sigmas[0].
    """
    _check_method(method)
    schedule = _as_schedule(sigmas)
    if not isinstance(noise, Tensor) or noise.dim() < 1:
        raise ValueError("noise must be a tensor [N, ...] of unit-variance Gaussian noise")
    x = noise * schedule[0]
    trajectory = [x]
    for sigma_from, sigma_to in zip(schedule[:-1], schedule[1:]):
        x = ode_step(denoiser, x, sigma_from, sigma_to, method)
        trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_trajectory else x


def function_evaluations(steps: int, method: str) -> int:
    """Denoiser calls (NFE) of sample_ode with `steps` steps: euler / ddim `steps`, heun 2 * steps - 1
    (the last step, to sigma = 0, has no correction)."""
    steps = _check_steps(steps)
    _check_method(method)
    return 2 * steps - 1 if method == "heun" else steps
