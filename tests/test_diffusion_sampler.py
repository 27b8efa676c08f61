"""Tests for distill.diffusion.sampler against the exact probability-flow ODE map of a Gaussian.

For data N(m, diag(s^2)) the noised marginal at level sigma is N(m, s^2 + sigma^2), so the exact denoiser
is D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m), and the ODE dx/dsigma = (x - D) / sigma =
(x - m) sigma / (s^2 + sigma^2) keeps (x - m) / sqrt(s^2 + sigma^2) constant: the map from x_T at
sigma_max to data is linear, x_0 = m + s / sqrt(s^2 + sigma_max^2) (x_T - m).
"""
from __future__ import annotations

import math

import pytest
import torch

from distill.diffusion.sampler import (METHODS, few_step_sigmas, function_evaluations, karras_sigmas, ode_step,
                                      sample_ode)

torch.set_num_threads(1)

MEAN = torch.tensor([0.3, -1.2], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5], dtype=torch.float64)  # 0.5 = EDM's sigma_data; two scales at once
SIGMA_MAX = 80.0


def gaussian_denoiser(x, sigma):
    return MEAN + STD**2 / (STD**2 + sigma[:, None] ** 2) * (x - MEAN)


def unit_noise(num_examples=16, seed=0):
    return torch.randn(num_examples, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative_error(samples, noise):
    """Max relative error of the sampled map's coefficient, (x_0 - m) / (x_T - m), against the exact one."""
    start = noise * SIGMA_MAX - MEAN
    exact_coefficient = STD / torch.sqrt(STD**2 + SIGMA_MAX**2)
    return ((samples - MEAN) / start / exact_coefficient - 1).abs().max().item()


class CountingDenoiser:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return gaussian_denoiser(x, sigma)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

def test_karras_sigmas_values():
    sigmas = karras_sigmas(3, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7  # i / (steps - 1) = 1/2
    torch.testing.assert_close(sigmas, torch.tensor([80.0, middle, 0.002, 0.0], dtype=torch.float64))
    torch.testing.assert_close(karras_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))
    for steps in (1, 2, 7, 40):
        sigmas = karras_sigmas(steps, sigma_max=10.0)
        assert sigmas.shape == (steps + 1,) and sigmas[0] == 10.0 and sigmas[-1] == 0
        assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_few_step_sigmas_count_every_step_and_nest():
    middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(few_step_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))
    # 2 steps: sigma_max, the Karras midpoint, 0; karras_sigmas(2) would be [80, 0.002, 0], one step in effect.
    torch.testing.assert_close(few_step_sigmas(2), torch.tensor([80.0, middle, 0.0], dtype=torch.float64))
    for steps in (1, 2, 4, 8, 16, 32):  # every other level of 2n steps is the n-step schedule
        torch.testing.assert_close(few_step_sigmas(2 * steps, sigma_max=40.0)[::2], few_step_sigmas(steps, sigma_max=40.0))
    # On a Gaussian, each doubling of Euler steps cuts the error (0.99, 0.81, 0.53, 0.30); karras_sigmas(2)
    # is no better than one step (0.99).
    noise = unit_noise()
    errors = [relative_error(sample_ode(gaussian_denoiser, noise, few_step_sigmas(n), "euler"), noise) for n in (1, 2, 4, 8)]
    assert all(later < 0.9 * earlier for earlier, later in zip(errors, errors[1:]))
    assert relative_error(sample_ode(gaussian_denoiser, noise, karras_sigmas(2), "euler"), noise) > 0.99 * errors[0]
    with pytest.raises(ValueError, match="steps"):
        few_step_sigmas(0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(steps=True), "steps"),
    (dict(steps=4, sigma_min=0.0), "sigma_min"), (dict(steps=4, sigma_min=90.0), "sigma_min"),
    (dict(steps=4, rho=0.0), "rho"),
])
def test_karras_sigmas_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        karras_sigmas(**kwargs)


# ---------------------------------------------------------------------------------------------
# Accuracy against the exact map
# ---------------------------------------------------------------------------------------------

def test_heun_matches_exact_map():
    noise = unit_noise()
    # Second order on EDM's schedule: ~1.5% of the output scale at 32 steps (63 NFE), < 0.1% at 128.
    # The error sits in the few large steps near sigma ~ s, where the trajectory bends.
    assert relative_error(sample_ode(gaussian_denoiser, noise, karras_sigmas(32), "heun"), noise) < 2e-2
    assert relative_error(sample_ode(gaussian_denoiser, noise, karras_sigmas(128), "heun"), noise) < 1e-3


def test_convergence_orders():
    """Doubling the steps halves Euler's error (1st order) and quarters Heun's (2nd order)."""
    noise = unit_noise()
    for method, expected_ratio in (("euler", 2.0), ("ddim", 2.0), ("heun", 4.0)):
        errors = [relative_error(sample_ode(gaussian_denoiser, noise, karras_sigmas(steps), method), noise)
                  for steps in (16, 32, 64, 128)]
        ratios = [errors[k] / errors[k + 1] for k in range(len(errors) - 1)]
        assert all(later < earlier for earlier, later in zip(errors, errors[1:])), (method, errors)
        for ratio in ratios:
            assert abs(math.log2(ratio) - math.log2(expected_ratio)) < 0.25, (method, ratios)


def test_ddim_equals_euler():
    noise = unit_noise()
    for steps in (1, 2, 5, 18):
        sigmas = karras_sigmas(steps)
        torch.testing.assert_close(sample_ode(gaussian_denoiser, noise, sigmas, "ddim"),
                                   sample_ode(gaussian_denoiser, noise, sigmas, "euler"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_is_the_denoiser_at_sigma_max(method):
    noise = unit_noise()
    sample = sample_ode(gaussian_denoiser, noise, karras_sigmas(1), method)
    expected = gaussian_denoiser(noise * SIGMA_MAX, torch.full((noise.shape[0],), SIGMA_MAX, dtype=torch.float64))
    torch.testing.assert_close(sample, expected)


def test_custom_schedule_and_float32():
    noise = unit_noise().float()
    sigmas = [SIGMA_MAX, 20.0, 3.0, 0.7, 0.1, 0.0]  # a plain list works too
    denoiser = lambda x, sigma: gaussian_denoiser(x.double(), sigma.double()).float()  # noqa: E731
    sample = sample_ode(denoiser, noise, sigmas, "heun")
    assert sample.dtype == torch.float32
    # Five coarse steps are far from the exact map, but float32 follows the float64 run closely.
    torch.testing.assert_close(sample.double(), sample_ode(gaussian_denoiser, noise.double(), sigmas, "heun"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_trajectory(method):
    noise = unit_noise(num_examples=3)
    sigmas = karras_sigmas(6)
    sample, trajectory = sample_ode(gaussian_denoiser, noise, sigmas, method, return_trajectory=True)
    assert trajectory.shape == (7, 3, 2)
    torch.testing.assert_close(trajectory[0], noise * SIGMA_MAX)
    torch.testing.assert_close(trajectory[-1], sample)
    # Each entry is one ode_step from the previous.
    torch.testing.assert_close(trajectory[3], ode_step(gaussian_denoiser, trajectory[2], sigmas[2], sigmas[3], method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_function_evaluations_count_the_calls(method, steps):
    denoiser = CountingDenoiser()
    sample_ode(denoiser, unit_noise(), karras_sigmas(steps), method)
    assert denoiser.calls == function_evaluations(steps, method)
    assert function_evaluations(steps, method) == (2 * steps - 1 if method == "heun" else steps)


# ---------------------------------------------------------------------------------------------
# ode_step with per-example levels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_ode_step_per_example_sigmas(method):
    x = unit_noise(num_examples=4) * 5
    sigma_from = torch.tensor([5.0, 2.0, 1.0, 0.3], dtype=torch.float64)
    sigma_to = torch.tensor([4.0, 0.0, 0.5, 0.0], dtype=torch.float64)  # heun skips its correction at 0
    batched = ode_step(gaussian_denoiser, x, sigma_from, sigma_to, method)
    for k in range(4):
        single = ode_step(gaussian_denoiser, x[k:k + 1], sigma_from[k].item(), sigma_to[k].item(), method)
        torch.testing.assert_close(batched[k:k + 1], single)


def test_ode_step_to_zero_returns_the_denoised_estimate():
    x = unit_noise() * 3
    sigma = torch.full((x.shape[0],), 3.0, dtype=torch.float64)
    for method in METHODS:
        torch.testing.assert_close(ode_step(gaussian_denoiser, x, 3.0, 0.0, method), gaussian_denoiser(x, sigma))


def test_heun_step_formula_by_hand():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    denoiser = lambda x, sigma: 0.5 * x  # noqa: E731  slope (x - D) / sigma = x / (2 sigma)
    # euler from 2 to 1: x + (1 - 2) * x / 4 = 0.75 x; slope there 0.75 x / 2; heun: x - (x/4 + 0.375 x) / 2
    torch.testing.assert_close(ode_step(denoiser, x, 2.0, 1.0, "euler"), 0.75 * x)
    torch.testing.assert_close(ode_step(denoiser, x, 2.0, 1.0, "heun"), x - (0.25 + 0.375) / 2 * x)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigmas, match", [
    ([80.0], "at least 2"),
    ([80.0, 1.0], "end with 0"),
    ([1.0, 5.0, 0.0], "strictly decreasing"),
    ([5.0, 5.0, 0.0], "strictly decreasing"),
    ([5.0, -1.0, 0.0], "> 0"),
    ([float("inf"), 1.0, 0.0], "finite"),
    ([[5.0, 0.0]], "1-D"),
])
def test_sample_ode_bad_schedules(sigmas, match):
    for method in METHODS:
        with pytest.raises(ValueError, match=f"sigmas.*{match}|{match}.*sigmas"):
            sample_ode(gaussian_denoiser, unit_noise(), sigmas, method)


def test_bad_method_and_shapes():
    with pytest.raises(ValueError, match="method must be one of euler, heun, ddim"):
        sample_ode(gaussian_denoiser, unit_noise(), karras_sigmas(2), "dpm")
    with pytest.raises(ValueError, match="method"):
        function_evaluations(3, "rk4")
    with pytest.raises(ValueError, match="steps"):
        function_evaluations(0, "euler")
    with pytest.raises(ValueError, match="denoiser must return"):
        sample_ode(lambda x, sigma: x[:, :1], unit_noise(), karras_sigmas(2))
    x = unit_noise(num_examples=3)
    with pytest.raises(ValueError, match="sigma_to"):
        ode_step(gaussian_denoiser, x, 1.0, 2.0)
    with pytest.raises(ValueError, match="sigma_to"):
        ode_step(gaussian_denoiser, x, 1.0, -0.5)
    with pytest.raises(ValueError, match="sigma_from"):
        ode_step(gaussian_denoiser, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma_from must be a number or an \\[N\\] tensor with N = 3"):
        ode_step(gaussian_denoiser, x, torch.ones(2), 0.0)
