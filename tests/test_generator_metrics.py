"""Tests for distill.diffusion.metrics: hand-made samples with known answers, naive references (loops, sorting,
scipy), closed forms (shifts, diagonal Gaussians), the noise floor and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from distill.diffusion.metrics import (
    frechet_distance, gmm_metrics, mmd, mode_stats, noise_floor, precision_recall, sliced_wasserstein,
)
from distill.diffusion.gmm2d import GaussianMixture2D

torch.set_num_threads(1)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# mode_stats: hand-made samples
# ---------------------------------------------------------------------------------------------

def test_samples_exactly_at_the_modes():
    mixture = GaussianMixture2D.ring()
    stats = mode_stats(mixture.means.repeat(10, 1), mixture)
    assert stats == {"precision": 1.0, "modes_covered": 8, "num_modes": 8, "tv": 0.0,
                     "rarest_mode_mass": 1 / 8, "rarest_mode_weight": pytest.approx(1 / 8)}


def test_samples_all_at_one_mode():
    mixture = GaussianMixture2D.ring()
    stats = mode_stats(mixture.means[:1].repeat(40, 1) + 0.01, mixture)
    assert stats["precision"] == 1.0 and stats["modes_covered"] == 1
    # TV = 1/2 (|1 - 1/8| + 7 |0 - 1/8|) = 7/8; the rarest mode (7) gets nothing.
    assert stats["tv"] == pytest.approx(7 / 8)
    assert stats["rarest_mode_mass"] == 0.0


def test_coverage_threshold_precision_and_tv_by_hand():
    mixture = GaussianMixture2D.grid(side=2, spacing=1.0, std=0.05)  # 4 modes, weight 1/4 each
    counts = [50, 40, 5, 4]
    x = torch.cat([mixture.means[k].expand(c, 2) for k, c in enumerate(counts)] + [torch.tensor([[5.0, 5.0]])])
    x[0] += torch.tensor([0.1, 0.1])  # 2.8 stds from mode 0: still near (within 3)
    stats = mode_stats(x, mixture, coverage_share=0.2)  # threshold 0.2 * 1/4 * 100 = 5 samples
    assert stats["precision"] == pytest.approx(99 / 100)
    assert stats["modes_covered"] == 3  # 5 >= 5 covered, 4 < 5 not
    assert stats["tv"] == pytest.approx(0.5 * sum(abs(c / 99 - 0.25) for c in counts))
    assert stats["rarest_mode_mass"] == pytest.approx(4 / 100) and stats["rarest_mode_weight"] == 0.25
    # A tighter radius drops the displaced sample from precision.
    assert mode_stats(x, mixture, radius_stds=2.0)["precision"] == pytest.approx(98 / 100)


def test_no_sample_near_any_mode():
    mixture = GaussianMixture2D.ring()
    stats = mode_stats(torch.full((5, 2), 10.0), mixture)
    assert (stats["precision"], stats["modes_covered"], stats["tv"]) == (0.0, 0, 1.0)


def test_exact_samples_score_the_chi_square_precision_and_find_the_rare_mode():
    mixture = GaussianMixture2D.ring(imbalance=10.0)
    samples = mixture.sample(20000, torch.Generator().manual_seed(1))
    stats = mode_stats(samples, mixture)
    assert stats["precision"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)  # P(chi_2 <= 3)
    assert stats["modes_covered"] == 8 and stats["tv"] < 0.02
    assert stats["rarest_mode_mass"] == pytest.approx(stats["rarest_mode_weight"] * (1 - math.exp(-4.5)), abs=0.005)


# ---------------------------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------------------------

def _naive_mmd(x, y, bandwidths):
    def k(a, b):
        squared = float((a - b).square().sum())
        return sum(math.exp(-squared / (2 * h * h)) for h in bandwidths) / len(bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_naive_u_statistic():
    x, y = _randn(7, 3, seed=0), _randn(5, 3, seed=1) + 0.3
    for bandwidths in ((0.5,), (0.1, 1.0, 3.0)):
        assert mmd(x, y, bandwidths) == pytest.approx(_naive_mmd(x, y, bandwidths), rel=1e-10)
    median = float(torch.pdist(torch.cat([x, y])).median())
    assert mmd(x, y, "median") == pytest.approx(_naive_mmd(x, y, [f * median for f in (0.25, 0.5, 1, 2, 4)]))
    assert mmd(x, y) == pytest.approx(mmd(y, x))  # symmetric
    assert mmd(x.float(), y.float()) == pytest.approx(mmd(x, y), rel=1e-5)


def test_mmd_near_zero_for_the_same_distribution_and_large_for_a_shift():
    mixture = GaussianMixture2D.ring()
    generator = torch.Generator().manual_seed(0)
    first, second = mixture.sample(1000, generator), mixture.sample(1000, generator)
    same = mmd(first, second)
    shifted = mmd(first, second + torch.tensor([0.3, 0.0]))
    assert abs(same) < 2e-3
    assert shifted > 0.05 and shifted > 50 * abs(same)


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein
# ---------------------------------------------------------------------------------------------

def test_sliced_wasserstein_in_one_dimension_is_exact_w1():
    x, y = _randn(50, 1, seed=0), 2 * _randn(50, 1, seed=1) + 0.5
    sorted_w1 = float((x[:, 0].sort().values - y[:, 0].sort().values).abs().mean())  # equal counts: sort
    assert sliced_wasserstein(x, y, num_projections=3) == pytest.approx(sorted_w1, rel=1e-12)
    # Unequal counts against scipy's exact 1-D W1.
    stats = pytest.importorskip("scipy.stats")
    z = _randn(37, 1, seed=2) * 0.5
    assert sliced_wasserstein(x, z, num_projections=2) == pytest.approx(
        stats.wasserstein_distance(x[:, 0].numpy(), z[:, 0].numpy()), rel=1e-12)


def test_sliced_wasserstein_matches_sorting_along_the_same_directions():
    x, y = _randn(40, 3, seed=0), _randn(40, 3, seed=1) * 1.5
    directions = torch.randn(16, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    expected = sum(float(((x @ d).sort().values - (y @ d).sort().values).abs().mean()) for d in directions) / 16
    assert sliced_wasserstein(x, y, 16, torch.Generator().manual_seed(5)) == pytest.approx(expected, rel=1e-12)


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_length():
    x = GaussianMixture2D.ring().sample(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.6, -0.8], dtype=torch.float64)  # |v| = 1: E|<v, theta>| = 2 / pi in 2-D
    assert sliced_wasserstein(x, x + shift, num_projections=4096) == pytest.approx(2 / math.pi, rel=0.03)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x + shift) == sliced_wasserstein(x, x + shift)  # deterministic default


# ---------------------------------------------------------------------------------------------
# gmm_metrics and the noise floor
# ---------------------------------------------------------------------------------------------

def test_noise_floor_is_small_and_positive():
    mixture = GaussianMixture2D.ring(imbalance=3.0)
    floor = noise_floor(mixture, 800, seeds=(0, 1))
    assert floor["num_seeds"] == 2 and floor["num_modes"] == 8
    assert 0.97 < floor["precision"] < 1.0 and floor["modes_covered"] == 8
    assert 0.0 < floor["tv"] < 0.06
    assert 0.0 < floor["sliced_wasserstein"] < 0.1
    assert abs(floor["mmd"]) < 3e-3
    assert floor["sliced_wasserstein_std"] > 0 and "num_modes_std" not in floor
    # A collapsed generator (only mode 0) is far above the floor.
    collapsed = mixture.sample(800, torch.Generator().manual_seed(9))
    collapsed = mixture.means[0].float() + (collapsed - mixture.means[mixture.labels_of(collapsed)].float())
    row = gmm_metrics(collapsed, mixture, mixture.sample(800, torch.Generator().manual_seed(10)))
    assert row["modes_covered"] == 1 and row["tv"] > 0.7
    assert row["mmd"] > 100 * abs(floor["mmd"]) and row["sliced_wasserstein"] > 10 * floor["sliced_wasserstein"]


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------

def _with_moments(n, mean, variances, seed):
    """n points whose sample mean and (unbiased) sample covariance are exactly mean and diag(variances)."""
    z = _randn(n, len(variances), seed=seed)
    z = z - z.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(z.T))
    z = z @ eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T  # now cov(z) = I exactly
    return torch.tensor(mean, dtype=torch.float64) + z * torch.tensor(variances, dtype=torch.float64).sqrt()


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a = _with_moments(200, [0.0, 1.0, -2.0, 0.5], [1.0, 4.0, 0.25, 2.0], seed=0)
    b = _with_moments(150, [1.0, 1.0, 0.0, 0.5], [9.0, 1.0, 0.25, 0.5], seed=1)
    mean_term = 1.0 + 0.0 + 4.0 + 0.0
    cov_term = sum((math.sqrt(p) - math.sqrt(q)) ** 2 for p, q in zip([1, 4, 0.25, 2], [9, 1, 0.25, 0.5]))
    assert frechet_distance(a, b) == pytest.approx(mean_term + cov_term, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(mean_term + cov_term, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_on_itself():
    linalg = pytest.importorskip("scipy.linalg")
    a = _randn(300, 6, seed=0) @ _randn(6, 6, seed=1)
    b = _randn(200, 6, seed=2) @ _randn(6, 6, seed=3) + 0.5
    cov_a, cov_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float((a.mean(0) - b.mean(0)).square().sum()) + float((cov_a + cov_b - 2 * root).trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    few = _randn(5, 20, seed=4)  # N <= D: singular covariance, still finite and 0 on itself
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(frechet_distance(few, _randn(8, 20, seed=5)))


# ---------------------------------------------------------------------------------------------
# Improved precision / recall
# ---------------------------------------------------------------------------------------------

def _naive_precision_recall(real, fake, k):
    def radius(points, i):
        return sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)[k - 1]

    def inside(query, points):
        return any(float((query - points[i]).norm()) <= radius(points, i) for i in range(len(points)))

    return (sum(inside(f, real) for f in fake) / len(fake), sum(inside(r, fake) for r in real) / len(real))


def test_precision_recall_matches_the_naive_definition():
    real, fake = _randn(23, 3, seed=0), _randn(17, 3, seed=1) * 1.3 + 0.4
    for k in (1, 3):
        assert precision_recall(real, fake, k) == pytest.approx(_naive_precision_recall(real, fake, k))


def test_precision_recall_on_known_point_sets():
    cluster_a, cluster_b = _randn(60, 4, seed=0), _randn(40, 4, seed=1) + 100.0
    real = torch.cat([cluster_a, cluster_b])
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(cluster_a, cluster_b) == (0.0, 0.0)
    # The fake set covers cluster A only: all of it looks real, only A's share of the data is recalled.
    precision, recall = precision_recall(real, cluster_a.clone())
    assert precision == 1.0 and recall == pytest.approx(60 / 100)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

RING = GaussianMixture2D.ring()
POINTS = torch.zeros(10, 2)


@pytest.mark.parametrize("call, name", [
    (lambda: mode_stats(torch.zeros(10, 3), RING), "x"),
    (lambda: mode_stats(torch.zeros(0, 2), RING), "x"),
    (lambda: mode_stats(POINTS, "ring"), "mixture"),
    (lambda: mode_stats(POINTS, RING, radius_stds=0), "radius_stds"),
    (lambda: mode_stats(POINTS, RING, coverage_share=1.5), "coverage_share"),
    (lambda: mmd(POINTS[:1], POINTS), "x"),
    (lambda: mmd(POINTS, torch.zeros(10, 3)), "y"),
    (lambda: mmd(POINTS, POINTS, bandwidths=(0.1, -1.0)), "bandwidths"),
    (lambda: mmd(POINTS, POINTS, bandwidths="mean"), "bandwidths"),
    (lambda: mmd(POINTS, POINTS, bandwidths="median"), "bandwidths"),  # all distances 0
    (lambda: mmd(torch.full((3, 2), float("nan")), POINTS), "x"),
    (lambda: sliced_wasserstein(POINTS, POINTS, num_projections=0), "num_projections"),
    (lambda: sliced_wasserstein(POINTS, [[0.0, 0.0]]), "y"),
    (lambda: noise_floor(RING, 1), "n"),
    (lambda: noise_floor(RING, 10, seeds=()), "seeds"),
    (lambda: frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4)), "features_a"),
    (lambda: frechet_distance(torch.zeros(5, 4), torch.zeros(5, 3)), "features_b"),
    (lambda: precision_recall(torch.zeros(3, 2), POINTS, k=3), "real_features"),
    (lambda: precision_recall(POINTS, torch.zeros(10, 2, dtype=torch.long)), "fake_features"),
    (lambda: precision_recall(POINTS, POINTS, k=0), "k"),
])
def test_bad_inputs_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
