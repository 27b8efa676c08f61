"""Sample-quality metrics for generators: pure functions on tensors that return Python numbers.

- 2-D Gaussian mixtures (distill.diffusion.gmm2d), where the truth is known exactly: mode_stats (precision, mode
  coverage, total variation of the mode histogram, the rarest mode's mass), mmd and sliced_wasserstein against
  a reference sample, gmm_metrics (all of them at once) and noise_floor (what exact samples score: the
  "data vs data" row that a perfect generator would reach, since every metric here is estimated from samples);
- image features (e.g. a digits classifier's embeddings): frechet_distance (FID's formula) and the improved
  precision / recall of Kynkaanniemi et al. 2019.

All computation is in float64 whatever the input dtype. Pairwise quantities are computed in row chunks, so
memory stays O(chunk x M) while the time is O(N M).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from distill.diffusion.gmm2d import GaussianMixture2D

__all__ = [
    "DEFAULT_BANDWIDTHS", "MEDIAN_MULTIPLES", "frechet_distance", "gmm_metrics", "mmd", "mode_stats",
    "noise_floor", "precision_recall", "sliced_wasserstein",
]

# MMD kernel bandwidths in data units, chosen for the gmm2d defaults (component std 0.05, modes ~1-1.5 apart,
# ring radius 2): the small ones see whether each mode is as sharp as the data's, the large ones whether the
# mass is shared between modes in the right proportions.
DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# bandwidths="median": these multiples of the median pairwise distance (for data of unknown scale).
MEDIAN_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
_CHUNK_ROWS = 1024
_PROJECTION_CHUNK = 32


# ---------------------------------------------------------------------------------------------
# Validation and pairwise plumbing
# ---------------------------------------------------------------------------------------------

def _points(name: str, value: object, *, min_rows: int = 1, width: int | None = None) -> Tensor:
    """`value` is a floating [N, D] Tensor with N >= min_rows (and D == width); returned in float64."""
    expected = f"[N, {width}]" if width else "[N, D]"
    if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
        got = (f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
               else type(value).__name__)
        raise ValueError(f"{name} must be a floating point {expected} tensor (one row per sample), got {got}")
    if width is not None and value.shape[1] != width:
        raise ValueError(f"{name} has shape {tuple(value.shape)}: expected {expected}")
    if value.shape[0] < min_rows:
        raise ValueError(f"{name} has {value.shape[0]} samples: this metric needs at least {min_rows}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values: the generator diverged or the input is broken")
    return value.to(torch.float64)


def _same_width(first: str, a: Tensor, second: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{first} has {a.shape[1]} features per sample but {second} {b.shape[1]}: "
                         "compare samples (or features) of the same space")


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _distances(a: Tensor, b: Tensor) -> Tensor:
    # Direct differences (no ||a||^2 - 2ab + ||b||^2 expansion): d(x, x) is exactly 0.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _chunks(rows: Tensor):
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        yield rows[start:start + _CHUNK_ROWS]


# ---------------------------------------------------------------------------------------------
# 2-D Gaussian mixtures: exact mode statistics
# ---------------------------------------------------------------------------------------------

def mode_stats(x: Tensor, mixture: GaussianMixture2D, *, radius_stds: float = 3.0,
               coverage_share: float = 0.1) -> dict[str, float | int]:
    """Mode statistics of samples x [N, 2] against the exact mixture.

    Every sample is assigned to its nearest mode centre; it is *near* if within r = radius_stds * std of it.
    - precision = #near / N. Exact samples score P(chi_2 <= radius_stds) = 1 - exp(-radius_stds^2 / 2)
      (0.989 at 3 stds), not 1: compare with noise_floor;
    - mode k is covered when its near count n_k >= coverage_share * w_k * N (a share of its expected count);
      modes_covered (int) of num_modes;
    - tv = 1/2 sum_k |n_k / #near - w_k|, the total variation between the mode histogram of the near samples
      and the true weights, in [0, 1] (1 when no sample is near any mode);
    - rarest_mode_mass = n_r / N for the rarest mode r (mixture.rarest_mode), to read against its true
      weight rarest_mode_weight = w_r: mode-seeking students lose the rare mode first.
    Mode coverage / "high-quality samples" as in the GAN mode-collapse literature (Metz et al. 2017,
    "Unrolled GANs"; Srivastava et al. 2017, "VEEGAN"), with a weight-relative coverage threshold.
    """
    if not isinstance(mixture, GaussianMixture2D):
        raise ValueError(f"mixture must be a GaussianMixture2D, got {type(mixture).__name__}")
    points = _points("x", x, width=2)
    radius = _positive("radius_stds", radius_stds) * mixture.std
    coverage_share = _positive("coverage_share", coverage_share)
    if coverage_share > 1:
        raise ValueError(f"coverage_share must be in (0, 1], a share of each mode's expected count, "
                         f"got {coverage_share}")
    num_samples, weights = points.shape[0], mixture.weights
    nearest_distance, nearest_mode = _distances(points, mixture.means).min(dim=1)
    near = nearest_distance <= radius
    counts = torch.bincount(nearest_mode[near], minlength=mixture.num_modes).to(torch.float64)
    num_near = float(counts.sum())
    covered = counts >= coverage_share * weights * num_samples
    tv = 0.5 * float((counts / num_near - weights).abs().sum()) if num_near else 1.0
    rarest = mixture.rarest_mode
    return {
        "precision": num_near / num_samples,
        "modes_covered": int(covered.sum()),
        "num_modes": mixture.num_modes,
        "tv": tv,
        "rarest_mode_mass": float(counts[rarest]) / num_samples,
        "rarest_mode_weight": float(weights[rarest]),
    }


# ---------------------------------------------------------------------------------------------
# Two-sample distances: MMD, sliced Wasserstein
# ---------------------------------------------------------------------------------------------

def _median_distance(x: Tensor, y: Tensor) -> float:
    # The first 1024 of each side are plenty for a median and keep this O(1) in N.
    pooled = torch.cat([x[:1024], y[:1024]])
    distances = torch.pdist(pooled)
    return float(distances.median()) if distances.numel() else 0.0


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | str = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased squared maximum mean discrepancy between samples x [N, D] and y [M, D] (N, M >= 2).

        MMD^2 = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
                - 2/(N M) sum_{i, j} k(x_i, y_j),
        k(a, b) = 1/H sum_h exp(-||a - b||^2 / (2 h^2))   (a mean of H Gaussian kernels, so k(a, a) = 1).

    Source: Gretton et al. 2012, "A Kernel Two-Sample Test" (JMLR), eq. 3 (the unbiased U-statistic); the sum
    of kernels over several bandwidths as in Li et al. 2015, "Generative Moment Matching Networks". Being
    unbiased, the estimate is centred on 0 for samples of the same distribution and can be slightly negative.
    bandwidths: the h values in data units, default DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1, 2), fixed
    so that numbers are comparable between generators on gmm2d; or "median" for MEDIAN_MULTIPLES
    (0.25, 0.5, 1, 2, 4) times the median pairwise distance of the pooled samples (data of unknown scale).
    Cost O((N + M)^2 H): subsample to a few thousand points.
    """
    x64, y64 = _points("x", x, min_rows=2), _points("y", y, min_rows=2)
    _same_width("x", x64, "y", y64)
    if isinstance(bandwidths, str):
        if bandwidths != "median":
            raise ValueError(f"bandwidths must be a sequence of numbers > 0 or 'median', got {bandwidths!r}")
        median = _median_distance(x64, y64)
        if median <= 0:
            raise ValueError("bandwidths='median' needs distinct points, but every pairwise distance is 0: "
                             "pass explicit bandwidths")
        scales = [multiple * median for multiple in MEDIAN_MULTIPLES]
    else:
        if not isinstance(bandwidths, Sequence) or not bandwidths:
            raise ValueError(f"bandwidths must be a non-empty sequence of numbers > 0 or 'median', got {bandwidths!r}")
        scales = [_positive("bandwidths", h) for h in bandwidths]

    def kernel_sum(a: Tensor, b: Tensor) -> float:
        total = 0.0
        for rows in _chunks(a):
            squared = _distances(rows, b).square()  # [chunk, M]; one kernel at a time keeps memory at that
            total += sum(float(torch.exp(squared / (-2 * h * h)).sum()) for h in scales) / len(scales)
        return total

    n, m = x64.shape[0], y64.shape[0]
    # k(a, a) = 1 exactly (d = 0), so the diagonal of the x-x and y-y sums is n and m.
    within_x = (kernel_sum(x64, x64) - n) / (n * (n - 1))
    within_y = (kernel_sum(y64, y64) - m) / (m * (m - 1))
    return within_x + within_y - 2 * kernel_sum(x64, y64) / (n * m)


def _wasserstein1_1d(projected_x: Tensor, projected_y: Tensor) -> Tensor:
    """Exact W1 between the empirical measures of each row: integral |F_x(t) - F_y(t)| dt, [P] values.

    Both CDFs are step functions that change only at the pooled sample values, so the integral is a sum
    over the gaps between consecutive pooled values: |F_x - F_y| on the gap times its length. Exact for
    any N and M (no interpolation of quantiles)."""
    n, m = projected_x.shape[1], projected_y.shape[1]
    values = torch.cat([projected_x, projected_y], dim=1)
    steps = torch.cat([projected_x.new_full((n,), 1.0 / n), projected_y.new_full((m,), -1.0 / m)])
    sorted_values, order = values.sort(dim=1)
    cdf_difference = steps[order].cumsum(dim=1)[:, :-1]  # F_x - F_y just right of each pooled value
    return (cdf_difference.abs() * sorted_values.diff(dim=1)).sum(dim=1)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-1 distance: SW_1(x, y) = mean over directions theta of W_1(<x, theta>, <y, theta>).

    theta: num_projections directions uniform on the unit sphere of R^D (normalised Gaussians); W_1 between
    the two 1-D projected samples is computed exactly for any sample counts N and M (the integral of
    |F_x - F_y|, see _wasserstein1_1d). W_1 rather than W_2 keeps the value in data units and linear in a
    shift: for y = x + v, SW_1 = E_theta |<v, theta>| (= 2 |v| / pi in 2-D).
    Source: Bonneel et al. 2015, "Sliced and Radon Wasserstein Barycenters of Measures"; Deshpande et al.
    2018, "Generative Modeling using the Sliced Wasserstein Distance".
    generator: draws the directions; None uses a fresh generator seeded 0, so the value is deterministic
    and every generator is scored on the same directions.
    """
    x64, y64 = _points("x", x), _points("y", y)
    _same_width("x", x64, "y", y64)
    num_projections = _count("num_projections", num_projections)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    directions = torch.randn(num_projections, x64.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True)
    total = 0.0
    for start in range(0, num_projections, _PROJECTION_CHUNK):
        chunk = directions[start:start + _PROJECTION_CHUNK]
        total += float(_wasserstein1_1d(chunk @ x64.T, chunk @ y64.T).sum())
    return total / num_projections


# ---------------------------------------------------------------------------------------------
# 2-D Gaussian mixtures: everything at once, and the data-vs-data floor
# ---------------------------------------------------------------------------------------------

def gmm_metrics(x: Tensor, mixture: GaussianMixture2D, reference: Tensor, *, radius_stds: float = 3.0,
                coverage_share: float = 0.1, bandwidths: Sequence[float] | str = DEFAULT_BANDWIDTHS,
                num_projections: int = 256) -> dict[str, float | int]:
    """mode_stats(x, mixture) plus "mmd" = mmd(x, reference) and "sliced_wasserstein" =
    sliced_wasserstein(x, reference): one row of a results table. `reference` holds exact samples of
    the mixture (mixture.sample), ideally as many as x."""
    stats = mode_stats(x, mixture, radius_stds=radius_stds, coverage_share=coverage_share)
    stats["mmd"] = mmd(x, reference, bandwidths)
    stats["sliced_wasserstein"] = sliced_wasserstein(x, reference, num_projections)
    return stats


# Keys of gmm_metrics that do not depend on the samples: no spread to report.
_CONSTANT_KEYS = ("num_modes", "rarest_mode_weight")


def noise_floor(mixture: GaussianMixture2D, n: int, seeds: Sequence[int] = (0, 1, 2),
                **metric_options) -> dict[str, float | int]:
    """The "data vs data" row: gmm_metrics between two independent exact sample sets of size n.

    For each seed s, x and reference are two draws of mixture.sample(n) from torch.Generator().manual_seed(s);
    returns the mean of each metric over the seeds and, for the ones that vary, its standard deviation as
    "<metric>_std" (0 for a single seed), plus "num_seeds". A perfect generator scores this, not 0: precision
    below 1, tv, MMD and SW above 0 are sampling noise. Use the same n (and metric_options, passed on to
    gmm_metrics) as for the generator being judged.
    """
    n = _count("n", n, minimum=2)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(_count("seeds", seed, minimum=0))
        samples = mixture.sample(n, generator, dtype=torch.float64)
        reference = mixture.sample(n, generator, dtype=torch.float64)
        rows.append(gmm_metrics(samples, mixture, reference, **metric_options))
    floor: dict[str, float | int] = {}
    for key in rows[0]:
        if key in _CONSTANT_KEYS:
            floor[key] = rows[0][key]
            continue
        values = torch.tensor([float(row[key]) for row in rows], dtype=torch.float64)
        floor[key] = float(values.mean())
        floor[f"{key}_std"] = float(values.std()) if len(rows) > 1 else 0.0
    floor["num_seeds"] = len(rows)
    return floor


# ---------------------------------------------------------------------------------------------
# Image features: Frechet distance, improved precision / recall
# ---------------------------------------------------------------------------------------------

def _symmetric_sqrt(matrix: Tensor) -> Tensor:
    """The PSD square root of a symmetric matrix; eigenvalues below 0 (round-off) are clamped to 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (N, M >= 2):

        FD = ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}),

    mu the sample means and C the unbiased sample covariances (divided by N - 1, as numpy.cov and pytorch-fid).
    Source: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (FID, with Inception features; here any features, e.g. a digits classifier's).
    Tr (C_a C_b)^{1/2} is computed as sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the symmetric PSD
    matrix C_a^{1/2} C_b C_a^{1/2} (similar to C_a C_b), in float64: no complex sqrtm, and singular
    covariances (N <= D) are fine. Round-off below 0 is clamped, so FD(x, x) = 0 up to ~1e-12 relative.
    """
    a = _points("features_a", features_a, min_rows=2)
    b = _points("features_b", features_b, min_rows=2)
    _same_width("features_a", a, "features_b", b)
    width = a.shape[1]
    covariance_a = torch.cov(a.T).reshape(width, width)
    covariance_b = torch.cov(b.T).reshape(width, width)
    root_a = _symmetric_sqrt(covariance_a)
    middle = root_a @ covariance_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric up to round-off; eigvalsh reads one triangle only
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    mean_term = (a.mean(dim=0) - b.mean(dim=0)).square().sum()
    value = mean_term + torch.trace(covariance_a) + torch.trace(covariance_b) - 2 * trace_sqrt
    return max(float(value), 0.0)


def _kth_neighbour_radii(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the point itself, at 0, is skipped)."""
    return torch.cat([_distances(rows, points).kthvalue(k + 1, dim=1).values for rows in _chunks(points)])


def _share_inside(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Share of queries within radii[i] of some centres[i] (inside the union of the k-NN balls)."""
    inside = torch.cat([(_distances(rows, centres) <= radii).any(dim=1) for rows in _chunks(queries)])
    return float(inside.to(torch.float64).mean())


def precision_recall(real_features: Tensor, fake_features: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall, (precision, recall), each in [0, 1].

    The manifold of a set Phi is the union of the balls B(phi, NN_k(phi)) around its points, NN_k(phi) the
    distance from phi to its k-th nearest neighbour in Phi (itself excluded). Then
        precision = share of fake samples inside the real manifold (how many generated samples look real),
        recall    = share of real samples inside the fake manifold (how much of the data is generated).
    A point on a ball's boundary counts as inside. Source: Kynkaanniemi et al. 2019, "Improved Precision and
    Recall Metric for Assessing Generative Models" (NeurIPS), eq. 1-3; k = 3 is the paper's choice. Both sets
    need more than k samples. Cost O((N + M)^2 D) time, O(chunk x max(N, M)) memory.
    """
    real = _points("real_features", real_features)
    fake = _points("fake_features", fake_features)
    _same_width("real_features", real, "fake_features", fake)
    k = _count("k", k)
    for name, features in (("real_features", real), ("fake_features", fake)):
        if features.shape[0] <= k:
            raise ValueError(f"{name} has {features.shape[0]} samples: the k-NN radii need more than k = {k} "
                             "(pass more samples or a smaller k)")
    precision = _share_inside(fake, real, _kth_neighbour_radii(real, k))
    recall = _share_inside(real, fake, _kth_neighbour_radii(fake, k))
    return precision, recall
