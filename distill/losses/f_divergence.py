"""f-divergence weights of DMD (f-distill): each f-divergence registered (kind "f_divergence") as an FDivergence,
and the per-example weight h(r) of the DMD generator gradient (`f_divergence_weight`, a diffusion piece)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.common import compute_dtype
from distill.losses.registry import Param, check_number, register, register_spec, specs

__all__ = ["FDivergence", "f_divergence_weight"]


@dataclass(frozen=True)
class FDivergence:
    """One f-divergence D_f(p_data || p_gen) = E_{p_gen}[f(r)], r = p_data / p_gen (f convex, f(1) = 0), as
    f-distill weighs DMD's gradient with it: calling it gives log h from log r, h(r) = f''(r) r^2.

    h is kept as log h, a function of log r: exact where r or h over/underflow (forward KL at log r = 800), and
    the batch normalisation becomes a softmax. Constant factors of h are kept as f gives them (FastGen drops
    some, e.g. h = sqrt(r) for squared Hellinger); they cancel under the batch-mean normalisation.
    """

    f: Callable[[Tensor], Tensor]  # f(r)
    log_weight: Callable[[Tensor], Tensor]  # log r -> log h(r)

    def __call__(self, log_ratio: Tensor) -> Tensor:
        return self.log_weight(log_ratio)


_F_DISTILL = "Xu, Nie & Vahdat 2025, One-step Diffusion Models with f-Divergence Distribution Matching"


def _register(name: str, f: Callable[[Tensor], Tensor], log_weight: Callable[[Tensor], Tensor], formula: str) -> None:
    register_spec(name, kind="f_divergence", fn=FDivergence(f, log_weight), formula=formula, paper=_F_DISTILL)


# Each: name, f(r), log h as a function of log r, and the formula `distill losses` shows.
_register("reverse_kl", lambda r: -torch.log(r), lambda log_r: torch.zeros_like(log_r),
          "KL(p_gen || p_data): f = -log r; h = 1 (plain DMD; mode seeking)")
_register("forward_kl", lambda r: r * torch.log(r), lambda log_r: log_r,
          "KL(p_data || p_gen): f = r log r; h = r (mode covering)")
_register("js", lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2), lambda log_r: F.logsigmoid(log_r),
          "2 JS(p_data, p_gen) (without JS's 1/2, as FastGen): f = r log r - (1 + r) log((1 + r) / 2); "
          "h = r / (1 + r), bounded")
_register("squared_hellinger", lambda r: (torch.sqrt(r) - 1) ** 2, lambda log_r: 0.5 * log_r - math.log(2.0),
          "f = (sqrt(r) - 1)^2; h = sqrt(r) / 2")
_register("jeffreys", lambda r: (r - 1) * torch.log(r), lambda log_r: F.softplus(log_r),
          "KL(p_data || p_gen) + KL(p_gen || p_data): f = (r - 1) log r; h = 1 + r")
_register("softened_reverse_kl", lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda log_r: F.logsigmoid(-log_r),
          "f-distill's softened reverse KL: f = (r + 1) log((r + 1) / (2 r)); h = 1 / (1 + r)")
_register("neyman_chi2", lambda r: (1 - r) ** 2 / r, lambda log_r: math.log(2.0) - log_r,
          "f = (1 - r)^2 / r; h = 2 / r")


@register("f_divergence_weight", kind="diffusion", is_objective=False, paper=_F_DISTILL,
          formula="h(r) = f''(r) r^2, r = p_data / p_gen, divided by its batch mean",
          params={"normalize": Param(True, "bool", doc="divide by the batch mean of h"),
                  "max_abs_log_ratio": Param(None, "float", low=0, low_open=True,
                                             doc="clamp |log r| to this first (FastGen: 10); None: no clamp")})
def f_divergence_weight(divergence: str, log_ratio: Tensor, *, normalize: bool = True,
                        max_abs_log_ratio: float | None = None) -> Tensor:
    """f-distill's per-example weight h(r) = f''(r) r^2 of the DMD gradient, r = p_data / p_gen; detached.

    The generator gradient of D_f(p_data,sigma || p_gen,sigma) is E[h(r(x_sigma)) (s_gen - s_data)(x_sigma)
    dx_sigma/dtheta], the score difference weighted by h (reverse KL: h = 1, i.e. DMD). log_ratio is
    log(p_data / p_gen) at each noised generator sample, [N] or any shape: e.g. the logit of a
    discriminator trained with logistic loss, real = 1 (DMD2's / FastGen's GAN head; FastGen averages the
    head's outputs per example first). normalize divides by the batch mean of h, as f-distill does to keep
    the gradient scale of DMD (its second, per-noise-level EMA normalisation of r is trainer state, left to
    the caller). max_abs_log_ratio clamps |log r| first (FastGen clamps the logit at +-10); default none.
    Computed in float64 from log h (see FDivergence), returned in log_ratio's dtype (float32 at least);
    unnormalised weights may overflow to inf for extreme ratios, normalised ones stay finite.
    Source: Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching".
    """
    divergences = {spec.name: spec.fn for spec in specs("f_divergence")}
    if divergence not in divergences:
        raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(divergences)}")
    if not isinstance(log_ratio, Tensor):
        raise ValueError(f"log_ratio must be a tensor of log(p_data / p_gen), got {type(log_ratio).__name__}")
    log_r = log_ratio.detach().to(torch.float64)
    if max_abs_log_ratio is not None:
        max_abs_log_ratio = check_number("max_abs_log_ratio", max_abs_log_ratio, 0.0, None, low_open=True)
        log_r = log_r.clamp(-max_abs_log_ratio, max_abs_log_ratio)
    log_weights = divergences[divergence](log_r)
    if normalize and log_weights.numel() > 0:
        # h / mean(h) = N softmax(log h): finite whatever the spread of the ratios.
        log_weights = log_weights - torch.logsumexp(log_weights.reshape(-1), dim=0) + math.log(log_weights.numel())
    return log_weights.exp().to(compute_dtype(log_ratio))
