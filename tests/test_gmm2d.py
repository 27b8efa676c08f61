"""Tests for distill.diffusion.gmm2d: layouts, sampling statistics, exact density / denoiser / score against
brute-force references (quadrature, naive formulas, autograd), limits, stability and bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

from distill.diffusion.gmm2d import GaussianMixture2D

torch.set_num_threads(1)


def _tiny_mixture() -> GaussianMixture2D:
    """Three broad, unequal modes: smooth enough for quadrature on a 0.02 grid."""
    return GaussianMixture2D(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]]),
                             torch.tensor([0.5, 0.3, 0.2]), std=0.3)


def _points(n: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def _naive_log_prob(mixture: GaussianMixture2D, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k N(x; mu_k, (s^2 + sigma^2) I), one point and one component at a time."""
    values = []
    for i in range(x.shape[0]):
        variance = mixture.std ** 2 + float(sigma[i]) ** 2
        density = 0.0
        for k in range(mixture.num_modes):
            squared = float((x[i] - mixture.means[k]).square().sum())
            density += float(mixture.weights[k]) * math.exp(-squared / (2 * variance)) / (2 * math.pi * variance)
        values.append(math.log(density))
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Layouts and exact facts
# ---------------------------------------------------------------------------------------------

def test_ring_layout_weights_and_rarest_mode():
    mixture = GaussianMixture2D.ring(num_modes=6, radius=1.5, std=0.1, imbalance=5.0)
    radii = torch.linalg.vector_norm(mixture.means, dim=1)
    torch.testing.assert_close(radii, torch.full((6,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(mixture.means[0], torch.tensor([1.5, 0.0], dtype=torch.float64))
    angles = torch.atan2(mixture.means[:, 1], mixture.means[:, 0]).remainder(2 * math.pi)
    torch.testing.assert_close(angles, 2 * math.pi * torch.arange(6, dtype=torch.float64) / 6)
    assert float(mixture.weights.sum()) == pytest.approx(1.0)
    assert float(mixture.weights[0] / mixture.weights[-1]) == pytest.approx(5.0)
    ratios = mixture.weights[1:] / mixture.weights[:-1]
    torch.testing.assert_close(ratios, torch.full((5,), 5.0 ** -0.2, dtype=torch.float64))  # geometric
    assert mixture.rarest_mode == 5
    assert GaussianMixture2D.ring().rarest_mode == 7  # equal weights: the last index
    torch.testing.assert_close(GaussianMixture2D.ring().weights, torch.full((8,), 1 / 8, dtype=torch.float64))


def test_ring_seed_rotates_reproducibly():
    plain, seeded, again = (GaussianMixture2D.ring(seed=s) for s in (None, 3, 3))
    torch.testing.assert_close(seeded.means, again.means)
    assert not torch.allclose(seeded.means, plain.means)
    radii = torch.linalg.vector_norm(seeded.means, dim=1)
    torch.testing.assert_close(radii, torch.full((8,), 2.0, dtype=torch.float64))


def test_grid_layout():
    mixture = GaussianMixture2D.grid(side=3, spacing=2.0, imbalance=2.0)
    assert mixture.num_modes == 9 and mixture.rarest_mode == 8
    torch.testing.assert_close(mixture.means[0], torch.tensor([-2.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(mixture.means[1], torch.tensor([0.0, -2.0], dtype=torch.float64))  # col first
    torch.testing.assert_close(mixture.means[8], torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(GaussianMixture2D.grid(side=4).mean, torch.zeros(2, dtype=torch.float64))


def test_sigma_data_is_the_exact_per_coordinate_std():
    ring = GaussianMixture2D.ring(num_modes=8, radius=2.0, std=0.05)
    # Balanced ring: each coordinate has variance s^2 + r^2 / 2.
    assert ring.sigma_data == pytest.approx(math.sqrt(0.05 ** 2 + 2.0))
    grid = GaussianMixture2D.grid(side=5, spacing=1.0, std=0.05)
    assert grid.sigma_data == pytest.approx(math.sqrt(0.05 ** 2 + 2.0))  # (4+1+0+1+4)/5 = 2 per coordinate
    torch.testing.assert_close(grid.covariance, grid.sigma_data ** 2 * torch.eye(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def test_sample_statistics_match_the_mixture():
    mixture = GaussianMixture2D.ring(imbalance=4.0)
    samples = mixture.sample(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert samples.shape == (20000, 2)
    torch.testing.assert_close(samples.mean(dim=0), mixture.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), mixture.covariance, atol=0.05, rtol=0)
    shares = torch.bincount(mixture.labels_of(samples), minlength=8).to(torch.float64) / 20000
    torch.testing.assert_close(shares, mixture.weights, atol=0.01, rtol=0)  # binomial std <= 0.003
    # Within a component, the offset from its mode has std `std` per coordinate.
    offsets = samples - mixture.means[mixture.labels_of(samples)]
    torch.testing.assert_close(offsets.std(dim=0), torch.full((2,), 0.05, dtype=torch.float64), atol=0.002, rtol=0)


def test_sample_is_reproducible_and_float32_by_default():
    mixture = GaussianMixture2D.grid(side=2)
    first = mixture.sample(50, torch.Generator().manual_seed(7))
    assert first.dtype == torch.float32
    assert torch.equal(first, mixture.sample(50, torch.Generator().manual_seed(7)))
    assert mixture.sample(0).shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# Density, denoiser, score against references
# ---------------------------------------------------------------------------------------------

def test_log_prob_matches_the_naive_formula_with_per_point_sigma():
    mixture = _tiny_mixture()
    x = _points(7)
    sigma = torch.tensor([0.0, 0.01, 0.3, 1.0, 2.5, 0.7, 10.0], dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(x, sigma), _naive_log_prob(mixture, x, sigma))
    torch.testing.assert_close(mixture.log_prob(x, sigma.view(7, 1)), _naive_log_prob(mixture, x, sigma))
    torch.testing.assert_close(mixture.log_prob(x, 0.3), _naive_log_prob(mixture, x, torch.full((7,), 0.3)))


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_log_prob_integrates_to_one(sigma):
    mixture = _tiny_mixture()
    step = 0.02
    axis = torch.arange(-5.0, 5.0, step, dtype=torch.float64) + step / 2
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    total = float(mixture.log_prob(grid, sigma).exp().sum()) * step * step
    assert total == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("sigma", [0.4, 1.0])
def test_denoiser_matches_brute_force_bayes(sigma):
    """E[x_0 | x_sigma = x] = int x_0 p_0(x_0) N(x; x_0, sigma^2 I) dx_0 / int p_0(x_0) N(...) dx_0 by quadrature."""
    mixture = _tiny_mixture()
    step = 0.02
    axis = torch.arange(-4.5, 4.5, step, dtype=torch.float64) + step / 2
    clean = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    prior = sum(float(w) * torch.exp(-(clean - mu).square().sum(1) / (2 * mixture.std ** 2))
                for w, mu in zip(mixture.weights, mixture.means))
    queries = torch.tensor([[0.0, 0.0], [-1.2, 0.1], [0.9, 0.9], [2.0, -2.0], [0.3, -0.8]], dtype=torch.float64)
    expected = []
    for query in queries:
        posterior = prior * torch.exp(-(clean - query).square().sum(1) / (2 * sigma ** 2))
        expected.append((posterior.unsqueeze(1) * clean).sum(0) / posterior.sum())
    torch.testing.assert_close(mixture.denoiser(queries, sigma), torch.stack(expected), atol=1e-5, rtol=0)


def test_denoiser_is_the_least_squares_estimate_by_monte_carlo():
    """E ||D(x_0 + sigma eps) - x_0||^2 over exact samples: no perturbation of D does better."""
    mixture = GaussianMixture2D.ring(num_modes=4, radius=1.0, std=0.2, imbalance=2.0)
    generator = torch.Generator().manual_seed(0)
    clean = mixture.sample(20000, generator, dtype=torch.float64)
    noisy = clean + 0.6 * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    denoised = mixture.denoiser(noisy, 0.6)
    best = float((denoised - clean).square().sum(1).mean())
    for shift in ([0.05, 0.0], [0.0, -0.05]):
        assert float((denoised + torch.tensor(shift, dtype=torch.float64) - clean).square().sum(1).mean()) > best
    for scale in (0.95, 1.05):
        assert float((scale * denoised - clean).square().sum(1).mean()) > best
    assert float((noisy - clean).square().sum(1).mean()) > best  # better than not denoising


def test_score_is_the_gradient_of_log_prob_and_tweedie():
    mixture = GaussianMixture2D.ring(num_modes=5, radius=1.0, std=0.2, imbalance=3.0)
    x = _points(9, seed=1, scale=1.5).requires_grad_(True)
    sigma = torch.linspace(0.05, 3.0, 9, dtype=torch.float64).view(9, 1)
    (autograd_score,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach(), sigma), autograd_score)
    tweedie = (mixture.denoiser(x.detach(), sigma) - x.detach()) / sigma.square()
    torch.testing.assert_close(mixture.score(x.detach(), sigma), tweedie)
    (clean_score,) = torch.autograd.grad(mixture.log_prob(x, 0.0).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach(), 0.0), clean_score)


def test_responsibilities_are_a_posterior():
    mixture = _tiny_mixture()
    responsibilities = mixture.responsibilities(_points(11), torch.full((11,), 0.5))
    assert responsibilities.shape == (11, 3)
    torch.testing.assert_close(responsibilities.sum(1), torch.ones(11, dtype=torch.float64))
    # Far noise: the data tells nothing, the posterior is the prior.
    prior = mixture.weights.expand(4, 3)
    torch.testing.assert_close(mixture.responsibilities(_points(4), 1e4), prior, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Limits and numerical stability
# ---------------------------------------------------------------------------------------------

def test_denoiser_limits():
    mixture = GaussianMixture2D.ring(imbalance=4.0)
    near_modes = mixture.means[:4] + torch.tensor([0.02, -0.03], dtype=torch.float64)
    between = torch.tensor([[0.0, 0.0], [1.5, 1.5]], dtype=torch.float64)
    x = torch.cat([near_modes, between])
    torch.testing.assert_close(mixture.denoiser(x, 1e-6), x, atol=1e-8, rtol=0)  # already clean
    torch.testing.assert_close(mixture.denoiser(x, 1e4), mixture.mean.expand(6, 2), atol=1e-6, rtol=0)
    # Moderate noise near a mode: pulled to that mode (the component posterior mean).
    denoised = mixture.denoiser(near_modes, 0.05)
    expected = mixture.means[:4] + 0.05 ** 2 / (2 * 0.05 ** 2) * (near_modes - mixture.means[:4])
    torch.testing.assert_close(denoised, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [1e-4, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_at_extreme_sigma_and_far_points(sigma, dtype):
    mixture = GaussianMixture2D.ring()
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1e3, -1e3], [-1e6, 3e5], [1.0, 1.0]], dtype=dtype)
    for value in (mixture.log_prob(x, sigma), mixture.denoiser(x, sigma), mixture.score(x, sigma),
                  mixture.responsibilities(x, sigma)):
        assert value.dtype == dtype
        assert torch.isfinite(value).all()
    # At tiny sigma far points barely move: D - x = sigma^2 / (s^2 + sigma^2) (m - x), a 4e-6 relative step.
    if sigma < 1:
        torch.testing.assert_close(mixture.denoiser(x, sigma)[2:4], x[2:4], rtol=1e-5, atol=0)


def test_float32_input_gives_float32_output_close_to_float64():
    mixture = _tiny_mixture()
    x = _points(6)
    torch.testing.assert_close(mixture.denoiser(x.float(), 0.3), mixture.denoiser(x, 0.3).float())
    assert mixture.log_prob(x.float()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: GaussianMixture2D.ring(num_modes=0), "num_modes"),
    (lambda: GaussianMixture2D.ring(num_modes=2.5), "num_modes"),
    (lambda: GaussianMixture2D.ring(radius=-1.0), "radius"),
    (lambda: GaussianMixture2D.ring(std=0.0), "std"),
    (lambda: GaussianMixture2D.ring(imbalance=0.5), "imbalance"),
    (lambda: GaussianMixture2D.ring(seed=-1), "seed"),
    (lambda: GaussianMixture2D.grid(side=0), "side"),
    (lambda: GaussianMixture2D.grid(spacing=float("nan")), "spacing"),
    (lambda: GaussianMixture2D(torch.zeros(3, 3), torch.ones(3) / 3, 0.1), "means"),
    (lambda: GaussianMixture2D(torch.zeros(3, 2), torch.ones(2) / 2, 0.1), "weights"),
    (lambda: GaussianMixture2D(torch.zeros(3, 2), torch.ones(3), 0.1), "weights"),
    (lambda: GaussianMixture2D(torch.zeros(2, 2), torch.tensor([1.0, 0.0]), 0.1), "weights"),
    (lambda: GaussianMixture2D(torch.zeros(2, 2), torch.tensor([0.5, 0.5]), -0.1), "std"),
])
def test_bad_construction_raises_naming_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize("call, name", [
    (lambda m: m.log_prob(torch.zeros(4, 3)), "x"),
    (lambda m: m.denoiser(torch.zeros(2), 0.1), "x"),
    (lambda m: m.denoiser(torch.zeros(4, 2, dtype=torch.long), 0.1), "x"),
    (lambda m: m.denoiser([[0.0, 0.0]], 0.1), "x"),
    (lambda m: m.denoiser(torch.zeros(4, 2), -0.1), "sigma"),
    (lambda m: m.score(torch.zeros(4, 2), float("inf")), "sigma"),
    (lambda m: m.score(torch.zeros(4, 2), torch.ones(3)), "sigma"),
    (lambda m: m.score(torch.zeros(4, 2), torch.tensor([0.1, -1.0, 0.1, 0.1])), "sigma"),
    (lambda m: m.log_prob(torch.zeros(4, 2), "0.1"), "sigma"),
    (lambda m: m.sample(-1), "n"),
])
def test_bad_call_raises_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call(GaussianMixture2D.ring())
