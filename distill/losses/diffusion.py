"""Diffusion / flow-model distillation objectives: denoising, flow matching, DMD (with f-divergence weights),
consistency, progressive distillation.

Conventions, shared by every function here:

- noise is EDM's (Karras et al. 2022): x_sigma = x_0 + sigma * eps; a denoiser D(x, sigma) estimates
  E[x_0 | x_sigma]; score = (D - x) / sigma^2 (see distill.diffusion.sampler);
- tensors are [N, ...] with the batch first; a noise level `sigma` is a number or an [N] tensor;
- reduction: the squared L2 norm (or its pseudo-Huber form) over each example's elements, then the
  mean over the batch: mean_n ||a_n - b_n||^2. This is the papers' E[||.||^2] and NVlabs/edm's sum over
  elements / batch size; DMD2 and FastGen instead take F.mse_loss's mean over all elements, smaller by
  the example size d (only the learning-rate scale differs);
- targets that must not be trained through (DMD's denoisers, the consistency target) are detached inside;
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from distill.losses.common import compute_dtype
from distill.losses.f_divergence import FDivergence, f_divergence_weight
from distill.losses.registry import Param, register

__all__ = [
    "CONSISTENCY_KINDS", "FDivergence",
    "consistency_loss", "consistency_parametrization", "dmd_generator_loss", "edm_denoise", "edm_denoising_loss",
    "edm_preconditioning", "f_divergence_weight", "flow_matching_loss", "flow_to_edm",
    "progressive_distillation_target", "velocity_to_denoised",
]

# DMD divides by the per-example mean |x - D_real|; a floor keeps a perfect sample from dividing by 0.
_DMD_NORMALIZER_FLOOR = 1e-6
_SIGMA_DATA = Param(0.5, "float", low=0, low_open=True, doc="standard deviation of the data (EDM's sigma_data)")


# ---------------------------------------------------------------------------------------------
# Shared plumbing: validation, dtype, per-example levels and reduction
# ---------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: Tensor) -> None:
    """Every argument is a Tensor [N, ...] of the first one's shape; ValueError naming the odd one out."""
    (first_name, first), *others = tensors.items()
    for name, value in tensors.items():
        if not isinstance(value, Tensor) or value.dim() < 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor [N, ...] with the batch first, got {got}")
    for name, value in others:
        if value.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but {first_name} {tuple(first.shape)}: "
                             "pass both for the same batch")


def _per_example(name: str, value: float | Tensor, reference: Tensor, dtype: torch.dtype) -> Tensor:
    """A number, a 0-dim or an [N] tensor as an [N] tensor (N = reference.shape[0])."""
    if isinstance(value, Tensor):
        values = value.to(dtype=dtype, device=reference.device)
    else:
        values = torch.tensor(float(value), dtype=dtype, device=reference.device)
    if values.dim() == 0:
        return values.expand(reference.shape[0])
    if values.shape != (reference.shape[0],):
        raise ValueError(f"{name} must be a number or an [N] tensor with N = {reference.shape[0]} (one per "
                         f"example), got shape {tuple(values.shape)}")
    return values


def _broadcastable(per_example: Tensor, reference: Tensor) -> Tensor:
    """[N] -> [N, 1, ..., 1], to multiply `reference` example by example."""
    return per_example.reshape(-1, *([1] * (reference.dim() - 1)))


def _squared_norms(difference: Tensor) -> Tensor:
    """||difference_n||^2 over each example's elements, [N]."""
    return difference.reshape(difference.shape[0], -1).square().sum(dim=1)


def _check_positive(name: str, value: float | Tensor) -> None:
    values = torch.as_tensor(value)
    if not bool((values > 0).all()) or not bool(torch.isfinite(values).all()):
        got = value if values.numel() == 1 else f"values from {values.min().item():g} to {values.max().item():g}"
        raise ValueError(f"{name} must be finite and > 0, got {got}")


# ---------------------------------------------------------------------------------------------
# EDM: preconditioning and the denoising loss
# ---------------------------------------------------------------------------------------------

def edm_preconditioning(sigma: float | Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) at noise level sigma (Karras et al. 2022, Table 1):

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4
    so that D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (see edm_denoise) has unit-variance network
    input and target. Each has the shape of sigma (a number gives 0-dim tensors). sigma > 0, sigma_data > 0.
    """
    _check_positive("sigma_data", sigma_data)
    sigma = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    _check_positive("sigma", sigma.detach())
    total_variance = sigma.square() + sigma_data**2
    c_skip = sigma_data**2 / total_variance
    c_out = sigma * sigma_data / total_variance.sqrt()
    c_in = total_variance.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoise(network: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: float | Tensor,
                sigma_data: float = 0.5) -> Tensor:
    """Wrap a raw network F into EDM's denoiser: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

    network(x_in [N, ...], c_noise [N]) -> [N, ...]; sigma a number or [N]. See edm_preconditioning.
    """
    _check_same_shape(x=x)
    sigma = _per_example("sigma", sigma, x, x.dtype)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    raw = network(_broadcastable(c_in, x) * x, c_noise)
    return _broadcastable(c_skip, x) * x + _broadcastable(c_out, x) * raw


@register("edm_denoising", kind="diffusion", params={"sigma_data": _SIGMA_DATA},
          formula="mean_n (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 ||D(x0 + sigma eps, sigma) - x0||^2",
          paper="Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models")
def edm_denoising_loss(denoised: Tensor, x0: Tensor, sigma: float | Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM denoising loss: mean_n lambda(sigma_n) ||D_n - x0_n||^2.

    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, and
    denoised = D(x0 + sigma eps, sigma); so with edm_denoise this is the unit-weight
    loss ||F - (x0 - c_skip x) / c_out||^2 on the raw network. Sampling sigma (EDM: ln sigma ~
    N(-1.2, 1.2^2)) is the caller's. Source: Karras et al. 2022, eq. 2 and Table 1. NVlabs/edm sums over
    elements then divides by the batch, as here; DMD2's fake-score loss takes the element mean (/ d).
    """
    _check_same_shape(denoised=denoised, x0=x0)
    _check_positive("sigma_data", sigma_data)
    dtype = compute_dtype(denoised, x0)
    sigma = _per_example("sigma", sigma, denoised, dtype)
    _check_positive("sigma", sigma.detach())
    weight = (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()
    return (weight * _squared_norms(denoised.to(dtype) - x0.to(dtype))).mean()


# ---------------------------------------------------------------------------------------------
# Flow matching, and its translation to EDM
# ---------------------------------------------------------------------------------------------

@register("flow_matching", kind="diffusion",
          formula="mean_n ||v(x_t, t) - (noise - x0)||^2, x_t = (1 - t) x0 + t noise",
          paper="Lipman et al. 2023, Flow Matching for Generative Modeling; Liu et al. 2023, Rectified Flow")
def flow_matching_loss(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Conditional flow matching / rectified flow: mean_n ||v_n - (noise_n - x0_n)||^2.

    Convention: x_t = (1 - t) x0 + t noise, t in [0, 1] (t = 1 is pure noise), and velocity =
    v(x_t, t) regresses the straight-line target dx_t/dt = noise - x0. Relation to EDM: x_t / (1 - t)
    = x0 + sigma noise with sigma = t / (1 - t), and the denoised estimate is D = x_t - t v
    (flow_to_edm, velocity_to_denoised). Sources: Lipman et al. 2023, "Flow Matching for Generative
    Modeling"; Liu et al. 2023, "Flow Straight and Fast: ... Rectified Flow".
    """
    _check_same_shape(velocity=velocity, x0=x0, noise=noise)
    dtype = compute_dtype(velocity, x0, noise)
    return _squared_norms(velocity.to(dtype) - (noise.to(dtype) - x0.to(dtype))).mean()


def velocity_to_denoised(velocity: Tensor, x_t: Tensor, t: float | Tensor) -> Tensor:
    """The x0 estimate of a flow model: D = x_t - t v (exact when v = noise - x0). t: number or [N]."""
    _check_same_shape(velocity=velocity, x_t=x_t)
    t = _per_example("t", t, x_t, compute_dtype(velocity, x_t))
    return x_t - _broadcastable(t, x_t) * velocity


def flow_to_edm(x_t: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
    """(x_sigma, sigma) = (x_t / (1 - t), t / (1 - t)): a flow-matching state in EDM's convention.

    An EDM sampler can then drive a flow model: at level sigma use t = sigma / (1 + sigma),
    x_t = x_sigma / (1 + sigma) and D = velocity_to_denoised(v(x_t, t), x_t, t). t in [0, 1), number or [N].
    """
    _check_same_shape(x_t=x_t)
    t = _per_example("t", t, x_t, compute_dtype(x_t))
    if not bool(((t >= 0) & (t < 1)).all()):
        raise ValueError("t must be in [0, 1): t = 1 is pure noise, sigma = infinity")
    return x_t / _broadcastable(1 - t, x_t), t / (1 - t)


# ---------------------------------------------------------------------------------------------
# The DMD generator loss (its f-divergence weights: f_divergence.py)
# ---------------------------------------------------------------------------------------------

@register("dmd_generator", kind="diffusion",
          formula="mean_n 0.5 ||x - sg(x - w (D_fake - D_real) / mean|x - D_real|)||^2",
          paper="Yin et al. 2024, One-step Diffusion with Distribution Matching Distillation (DMD; DMD2)",
          params={"normalize": Param(True, "bool", doc="divide the gradient by the mean |x - D_real| per example")})
def dmd_generator_loss(x: Tensor, real_denoised: Tensor, fake_denoised: Tensor, weight: Tensor | None = None, *,
                       normalize: bool = True) -> Tensor:
    """DMD's distribution-matching loss for the generator: a surrogate whose gradient is the DMD gradient.

    x: generator samples [N, ...] (with grad); real_denoised / fake_denoised: the teacher's and the fake
    (generator-score) denoiser at x_sigma = x + sigma eps; both are detached here. Per example,
        grad_n = w_n (fake_denoised_n - real_denoised_n) / mean_elements |x_n - real_denoised_n|
    (the normaliser, floored at 1e-6, only when normalize; w = weight, e.g. f_divergence_weight, else 1;
    weight is [N] or x's shape), and
        loss = mean_n 0.5 ||x_n - sg(x_n - grad_n)||^2 = mean_n 0.5 ||grad_n||^2,
    so d loss / d x_n = grad_n / N exactly. Unnormalised, E[grad] = sigma^2 E[s_gen - s_data] at x_sigma:
    the gradient of KL(p_gen,sigma || p_data,sigma) times sigma^2 (see the tests).
    Source: Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation";
    DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis") and
    FastGen use the same grad with F.mse_loss's element mean over all N d elements.
    """
    _check_same_shape(x=x, real_denoised=real_denoised, fake_denoised=fake_denoised)
    dtype = compute_dtype(x, real_denoised, fake_denoised)
    x = x.to(dtype)
    with torch.no_grad():
        real, fake = real_denoised.detach().to(dtype), fake_denoised.detach().to(dtype)
        grad = fake - real
        if normalize:
            normalizer = (x.detach() - real).abs().reshape(x.shape[0], -1).mean(dim=1)
            grad = grad / _broadcastable(normalizer.clamp(min=_DMD_NORMALIZER_FLOOR), x)
        if weight is not None:
            if not isinstance(weight, Tensor) or weight.shape not in (x.shape, (x.shape[0],)):
                got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
                raise ValueError(f"weight must be an [N] tensor (one per example) or shaped like x "
                                 f"{tuple(x.shape)}, got {got}")
            weight = weight.detach().to(dtype)
            grad = grad * (weight if weight.shape == x.shape else _broadcastable(weight, x))
        target = x.detach() - grad
    return 0.5 * _squared_norms(x - target).mean()


# ---------------------------------------------------------------------------------------------
# Consistency models
# ---------------------------------------------------------------------------------------------

def consistency_parametrization(sigma: float | Tensor, sigma_min: float = 0.002,
                                sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a consistency model f(x, sigma) = c_skip x + c_out F(x, sigma):

    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),
    so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0: f(x, sigma_min) = x, the boundary condition.
    sigma >= sigma_min (the model's domain), a number or a tensor; outputs have its shape.
    Source: Song et al. 2023, "Consistency Models", App. C (as openai/consistency_models).
    """
    _check_positive("sigma_min", sigma_min)
    _check_positive("sigma_data", sigma_data)
    sigma = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    if not bool((sigma.detach() >= sigma_min).all()):
        raise ValueError(f"sigma must be >= sigma_min = {sigma_min} (the consistency model's domain)")
    offset = sigma - sigma_min
    c_skip = sigma_data**2 / (offset.square() + sigma_data**2)
    c_out = offset * sigma_data / (sigma.square() + sigma_data**2).sqrt()
    return c_skip, c_out


CONSISTENCY_KINDS = ("l2", "pseudo_huber")


@register("consistency", kind="diffusion",
          formula="mean_n lambda_n d(f(x_{n+1}), sg f^-(x_n)), d = ||.||^2 or sqrt(||.||^2 + c^2) - c",
          paper="Song et al. 2023, Consistency Models; Song & Dhariwal 2023, Improved Techniques for Training CMs",
          params={"kind": Param("l2", "str", choices=CONSISTENCY_KINDS, doc="the distance d"),
                  "c": Param(None, "float", low=0, low_open=True,
                             doc="pseudo-Huber's c; None: 0.00054 sqrt(elements per example)")})
def consistency_loss(student_output: Tensor, target_output: Tensor, kind: str = "l2", *, c: float | None = None,
                     weight: Tensor | None = None) -> Tensor:
    """Consistency loss: mean_n w_n d(f_theta(x_{n+1}), sg(f_target(x_n))), per example.

    kind "l2":           d = ||a - b||^2 (Song et al. 2023, "Consistency Models");
    kind "pseudo_huber": d = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) by default, dim = elements
                         per example (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
                         Models"): ~ ||a - b||^2 / (2c) near 0, ~ ||a - b|| far away.
    student_output: the student at the noisier point; target_output: the EMA / stop-grad model at the
    teacher's ODE step (distill.diffusion.sampler.ode_step), detached here. weight: [N] lambda(sigma_n),
    e.g. iCT's 1 / (sigma_{n+1} - sigma_n); default 1. LPIPS (CM's image metric) is not provided.
    """
    if kind not in CONSISTENCY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CONSISTENCY_KINDS)}, got {kind!r}")
    _check_same_shape(student_output=student_output, target_output=target_output)
    dtype = compute_dtype(student_output, target_output)
    squared = _squared_norms(student_output.to(dtype) - target_output.detach().to(dtype))
    if kind == "l2":
        per_example = squared
    else:
        dim = student_output[0].numel()
        c = 0.00054 * math.sqrt(dim) if c is None else c
        _check_positive("c", c)
        per_example = torch.sqrt(squared + c * c) - c
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != (student_output.shape[0],):
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight must be an [N] tensor, one per example, N = {student_output.shape[0]}; got {got}")
        per_example = per_example * weight.detach().to(dtype)
    return per_example.mean()


# ---------------------------------------------------------------------------------------------
# Progressive distillation
# ---------------------------------------------------------------------------------------------

@register("progressive_distillation_target", kind="diffusion", is_objective=False,
          formula="D* = (sigma_t x_s^teacher - sigma_s x_t) / (sigma_t - sigma_s)",
          paper="Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models")
def progressive_distillation_target(x_t: Tensor, sigma_t: float | Tensor, sigma_s: float | Tensor,
                                    teacher_x_s: Tensor) -> Tensor:
    """The denoised target D* of progressive distillation, EDM / VE form.

    The student's one DDIM step from sigma_t to sigma_s, x_s = D + sigma_s (x_t - D) / sigma_t, must land on
    the teacher's two-step result teacher_x_s; solving for D:
        D* = (sigma_t teacher_x_s - sigma_s x_t) / (sigma_t - sigma_s)
           = x_t - sigma_t (teacher_x_s - x_t) / (sigma_s - sigma_t).
    At sigma_s = 0 it is teacher_x_s. Requires 0 <= sigma_s < sigma_t (numbers or [N]). Train the student's
    denoiser towards D* (e.g. edm_denoising_loss(D_student, D*, sigma_t)); compute D* under no_grad.
    Source: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Alg. 2
    (x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha), here with alpha = 1).
    """
    _check_same_shape(x_t=x_t, teacher_x_s=teacher_x_s)
    dtype = compute_dtype(x_t, teacher_x_s)
    sigma_t = _per_example("sigma_t", sigma_t, x_t, dtype)
    sigma_s = _per_example("sigma_s", sigma_s, x_t, dtype)
    if not bool(((sigma_s >= 0) & (sigma_s < sigma_t)).all()):
        raise ValueError("sigma_s must satisfy 0 <= sigma_s < sigma_t (the step goes towards clean data)")
    numerator = _broadcastable(sigma_t, x_t) * teacher_x_s.to(dtype) - _broadcastable(sigma_s, x_t) * x_t.to(dtype)
    return numerator / _broadcastable(sigma_t - sigma_s, x_t)
