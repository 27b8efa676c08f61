"""Tests for distill.losses.diffusion: naive references, hand values, gradcheck, properties, bad input, and
DMD / f-distill gradients against finite differences of closed-form divergences between 1-D Gaussians."""
from __future__ import annotations

import math

import pytest
import torch

from distill.diffusion.sampler import ode_step
from distill.losses import get_spec, specs
from distill.losses.diffusion import (
    consistency_loss, consistency_parametrization, dmd_generator_loss, edm_denoise, edm_denoising_loss,
    edm_preconditioning, f_divergence_weight, flow_matching_loss, flow_to_edm, progressive_distillation_target,
    velocity_to_denoised,
)

torch.set_num_threads(1)

F_DIVERGENCE_NAMES = sorted(spec.name for spec in specs("f_divergence"))


def f_divergence(name: str):
    """The registered f-divergence `name`: an FDivergence, with f(r) as `.f` and log h(log r) as `.log_weight`."""
    return get_spec(name, kind="f_divergence").fn

ODD_SHAPE = (3, 2, 5, 7)  # [N, C, H, W]


def _randn(*shape, seed=0, dtype=torch.float64, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _naive_sum_squares(a, b):
    """Per-example sum of squared differences, by an explicit loop."""
    return [sum((a[n].reshape(-1)[k] - b[n].reshape(-1)[k]) ** 2 for k in range(a[n].numel())) for n in range(len(a))]


# ---------------------------------------------------------------------------------------------
# EDM preconditioning and denoising loss
# ---------------------------------------------------------------------------------------------

def test_edm_preconditioning_hand_values():
    c_skip, c_out, c_in, c_noise = edm_preconditioning(0.5, sigma_data=0.5)  # sigma^2 + sigma_data^2 = 0.5
    for value, expected in ((c_skip, 0.5), (c_out, 0.25 / math.sqrt(0.5)), (c_in, 1 / math.sqrt(0.5)),
                            (c_noise, math.log(0.5) / 4)):
        assert value.item() == pytest.approx(expected, rel=1e-12)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_preconditioning(sigma, sigma_data=0.5)
    loss_weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss_weight * c_out**2, torch.ones_like(sigma))  # lambda = 1 / c_out^2
    # The network input c_in x_sigma has unit variance when x_0 has std sigma_data.
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones_like(sigma))
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-4) and c_skip[-1].item() < 1e-4


def test_edm_denoise_wraps_a_raw_network():
    x0, noise = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * noise
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
    seen = {}

    def network(x_in, noise_level):  # the ideal raw output: (x0 - c_skip x) / c_out
        seen["x_in"], seen["noise_level"] = x_in, noise_level
        return (x0 - c_skip[:, None] * x) / c_out[:, None]

    torch.testing.assert_close(edm_denoise(network, x, sigma), x0)
    torch.testing.assert_close(seen["x_in"], c_in[:, None] * x)
    torch.testing.assert_close(seen["noise_level"], c_noise)


def test_edm_denoising_loss_reference_and_gradcheck():
    denoised, x0 = _randn(*ODD_SHAPE, seed=1, requires_grad=True), _randn(*ODD_SHAPE, seed=2)
    sigma = torch.tensor([0.05, 1.0, 7.0], dtype=torch.float64)
    lam = [(s**2 + 0.25) / (s * 0.5) ** 2 for s in sigma.tolist()]
    expected = sum(w * d for w, d in zip(lam, _naive_sum_squares(denoised, x0))) / 3
    torch.testing.assert_close(edm_denoising_loss(denoised, x0, sigma), expected)
    assert edm_denoising_loss(x0, x0, 0.7).item() == 0.0
    small_x0 = _randn(3, 2, 2, seed=4)
    assert torch.autograd.gradcheck(lambda d: edm_denoising_loss(d, small_x0, sigma),
                                    (_randn(3, 2, 2, seed=3, requires_grad=True),))


def test_edm_loss_upcasts_half_inputs():
    denoised, x0 = _randn(2, 8, seed=1, dtype=torch.bfloat16), _randn(2, 8, seed=2, dtype=torch.bfloat16)
    assert edm_denoising_loss(denoised, x0, 1.0).dtype == torch.float32


@pytest.mark.parametrize("call, name", [
    (lambda: edm_denoising_loss(_randn(2, 3), _randn(2, 4), 1.0), "x0"),
    (lambda: edm_denoising_loss(_randn(2, 3), _randn(2, 3), 0.0), "sigma"),
    (lambda: edm_denoising_loss(_randn(2, 3), _randn(2, 3), torch.ones(3)), "sigma"),
    (lambda: edm_denoising_loss(_randn(2, 3), _randn(2, 3), 1.0, sigma_data=-1.0), "sigma_data"),
    (lambda: edm_preconditioning(-1.0), "sigma"),
    (lambda: flow_matching_loss(_randn(2, 3), _randn(2, 3), _randn(3, 3)), "noise"),
    (lambda: flow_to_edm(_randn(2, 3), 1.0), "t"),
    (lambda: flow_matching_loss([1.0], _randn(2, 3), _randn(2, 3)), "velocity"),
])
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------

def test_flow_matching_reference_gradcheck_and_edm_relation():
    x0, noise = _randn(*ODD_SHAPE, seed=1), _randn(*ODD_SHAPE, seed=2)
    velocity = _randn(*ODD_SHAPE, seed=3, requires_grad=True)
    expected = sum(_naive_sum_squares(velocity, noise - x0)) / ODD_SHAPE[0]
    torch.testing.assert_close(flow_matching_loss(velocity, x0, noise), expected)
    assert flow_matching_loss(noise - x0, x0, noise).item() == 0.0
    assert torch.autograd.gradcheck(lambda v: flow_matching_loss(v, x0[:, 0, :2, :2], noise[:, 0, :2, :2]),
                                    (_randn(3, 2, 2, seed=4, requires_grad=True),))
    # x_t = (1 - t) x0 + t noise: the exact velocity denoises to x0, and x_t / (1 - t) = x0 + sigma noise.
    t = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    x_t = (1 - t).reshape(-1, 1, 1, 1) * x0 + t.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(velocity_to_denoised(noise - x0, x_t, t), x0)
    x_sigma, sigma = flow_to_edm(x_t, t)
    torch.testing.assert_close(sigma, t / (1 - t))
    torch.testing.assert_close(x_sigma, x0 + sigma.reshape(-1, 1, 1, 1) * noise)


# ---------------------------------------------------------------------------------------------
# f-divergence weights
# ---------------------------------------------------------------------------------------------

RATIOS = [0.05, 0.3, 1.0, 2.5, 17.0]


@pytest.mark.parametrize("name", F_DIVERGENCE_NAMES)
def test_f_divergence_weight_is_f_second_derivative_times_r_squared(name):
    """h(r) = f''(r) r^2, with f'' by autograd twice; the FDivergence holds log h as a function of log r."""
    f, log_h = f_divergence(name).f, f_divergence(name).log_weight
    for ratio in RATIOS:
        r = torch.tensor(ratio, dtype=torch.float64, requires_grad=True)
        (first,) = torch.autograd.grad(f(r), r, create_graph=True)
        (second,) = torch.autograd.grad(first, r)
        expected = second * ratio**2
        torch.testing.assert_close(log_h(torch.tensor(math.log(ratio), dtype=torch.float64)).exp(), expected)
        assert expected.item() > 0  # f strictly convex
    assert f(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)  # D_f(p || p) = 0


def test_f_divergence_weight_closed_forms_and_normalisation():
    log_ratio = torch.log(torch.tensor(RATIOS, dtype=torch.float64))
    r = torch.tensor(RATIOS, dtype=torch.float64)
    closed_forms = {"reverse_kl": torch.ones_like(r), "forward_kl": r, "js": r / (1 + r)}
    for name, expected in closed_forms.items():
        torch.testing.assert_close(f_divergence_weight(name, log_ratio, normalize=False), expected)
        torch.testing.assert_close(f_divergence_weight(name, log_ratio), expected / expected.mean())
    weights = f_divergence_weight("js", log_ratio.float())
    assert weights.dtype == torch.float32 and weights.mean().item() == pytest.approx(1.0, rel=1e-6)


def test_f_divergence_weight_is_stable_and_detached():
    log_ratio = torch.tensor([-800.0, 0.0, 800.0], requires_grad=True)
    for name in F_DIVERGENCE_NAMES:
        weights = f_divergence_weight(name, log_ratio, max_abs_log_ratio=10.0)
        assert bool(torch.isfinite(weights).all()) and not weights.requires_grad, name
    # Unclamped, forward KL puts the whole batch weight on the example with the largest ratio.
    torch.testing.assert_close(f_divergence_weight("forward_kl", log_ratio), torch.tensor([0.0, 0.0, 3.0]))
    clamped = f_divergence_weight("forward_kl", log_ratio, normalize=False, max_abs_log_ratio=10.0)
    torch.testing.assert_close(clamped, torch.exp(torch.tensor([-10.0, 0.0, 10.0])))


def test_f_divergence_weight_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown divergence 'kl'; known: reverse_kl, forward_kl, js"):
        f_divergence_weight("kl", torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# DMD generator loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weight_kind", [None, "per_example", "elementwise"])
def test_dmd_gradient_is_the_intended_one(normalize, weight_kind):
    x = _randn(*ODD_SHAPE, seed=1, requires_grad=True)
    real = _randn(*ODD_SHAPE, seed=2, requires_grad=True)
    fake = _randn(*ODD_SHAPE, seed=3, requires_grad=True)
    weight = {None: None, "per_example": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
              "elementwise": _randn(*ODD_SHAPE, seed=4).abs()}[weight_kind]
    loss = dmd_generator_loss(x, real, fake, weight, normalize=normalize)
    loss.backward()
    grad = fake.detach() - real.detach()
    if normalize:
        grad = grad / (x.detach() - real.detach()).abs().mean(dim=(1, 2, 3), keepdim=True)
    if weight is not None:
        grad = grad * (weight.reshape(-1, 1, 1, 1) if weight.dim() == 1 else weight)
    number_of_examples = ODD_SHAPE[0]
    torch.testing.assert_close(x.grad, grad / number_of_examples, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * grad.square().sum() / number_of_examples)
    assert real.grad is None and fake.grad is None  # both denoisers are detached


def test_dmd_loss_properties_and_bad_weight():
    x, real = _randn(2, 5, seed=1, requires_grad=True), _randn(2, 5, seed=2)
    loss = dmd_generator_loss(x, real, real.clone())
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.abs().max().item() == 0.0
    # x == real_denoised: the normaliser is floored, not a division by zero.
    assert bool(torch.isfinite(dmd_generator_loss(real, real, x.detach())))
    assert dmd_generator_loss(x.float(), real.float(), real.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="weight must be an \\[N\\] tensor"):
        dmd_generator_loss(x, real, real, torch.ones(5))
    with pytest.raises(ValueError, match="fake_denoised"):
        dmd_generator_loss(x, real, _randn(2, 4))


# The required finite-difference check. Generator x = theta + z, z ~ N(0, s_g^2); data N(m, s_d^2). At noise
# level sigma both noised laws are Gaussian: p_gen,sigma = N(theta, v_g), p_data,sigma = N(m, v_d) with
# v = s^2 + sigma^2, and their exact denoisers are linear: D(y) = mu + s^2 / v (y - mu). Since
# D - y = sigma^2 score, (D_fake - D_real)(y) = sigma^2 (s_gen - s_data)(y), and because x_sigma = theta + z +
# sigma eps moves one-for-one with theta,
#     d/dtheta KL(p_gen,sigma || p_data,sigma) = E[(s_gen - s_data)(x_sigma)] = E[D_fake - D_real] / sigma^2.
# KL(N(theta, v_g) || N(m, v_d)) = 0.5 log(v_d / v_g) + (v_g + (theta - m)^2) / (2 v_d) - 0.5 in closed form.
# Unnormalised dmd_generator_loss has d loss / d x_n = (D_fake - D_real)_n / N, so theta.grad is the batch
# mean of D_fake - D_real: a Monte Carlo estimate of sigma^2 dKL/dtheta.
DATA_MEAN, DATA_STD, GEN_STD = 0.5, 0.8, 1.2


def _gaussian_denoiser(mean, std, sigma):
    return lambda y: mean + std**2 / (std**2 + sigma**2) * (y - mean)


def _kl_gen_data(theta, sigma):
    v_g, v_d = GEN_STD**2 + sigma**2, DATA_STD**2 + sigma**2
    return 0.5 * math.log(v_d / v_g) + (v_g + (theta - DATA_MEAN) ** 2) / (2 * v_d) - 0.5


@pytest.mark.parametrize("theta, sigma", [(-0.4, 0.6), (1.7, 0.3), (0.0, 2.5)])
def test_dmd_gradient_matches_finite_difference_of_kl(theta, sigma):
    step = 1e-4
    kl_slope = (_kl_gen_data(theta + step, sigma) - _kl_gen_data(theta - step, sigma)) / (2 * step)
    real = _gaussian_denoiser(DATA_MEAN, DATA_STD, sigma)
    fake = _gaussian_denoiser(theta, GEN_STD, sigma)  # the generator's own, current, denoiser
    # Exact expectation: both denoisers are linear, so E[D(x_sigma)] = D(E[x_sigma]) = D(theta).
    assert fake(theta) - real(theta) == pytest.approx(sigma**2 * kl_slope, rel=1e-6)

    generator = torch.Generator().manual_seed(0)
    num_samples = 200_000
    theta_tensor = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    x = theta_tensor + GEN_STD * torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    x_sigma = x.detach() + sigma * torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    dmd_generator_loss(x, real(x_sigma), fake(x_sigma), normalize=False).backward()
    # Standard error ~ |a_g - a_d| sqrt(v_g) / sqrt(N) <= 6e-4; the tolerance is ~5 standard errors.
    assert theta_tensor.grad.item() == pytest.approx(sigma**2 * kl_slope, abs=3e-3)

    theta_tensor.grad = None
    dmd_generator_loss(x, real(x_sigma), fake(x_sigma), normalize=True).backward()
    assert math.copysign(1, theta_tensor.grad.item()) == math.copysign(1, kl_slope)  # DMD's normaliser > 0


@pytest.mark.parametrize("name", F_DIVERGENCE_NAMES)
def test_f_weighted_dmd_gradient_matches_finite_difference_of_f_divergence(name):
    """f-distill: d/dtheta D_f(p_data,sigma || p_gen,sigma) = E_{p_gen,sigma}[h(r) (s_gen - s_data)], r = p_data/p_gen.

    Deterministic: the expectation is a quadrature on a grid of x_sigma values, fed to dmd_generator_loss as a
    batch with quadrature weights folded into `weight`; D_f itself by the same quadrature, differentiated by
    central finite differences. v_g < 2 v_d keeps every divergence here (Neyman chi^2 too) finite.
    """
    theta, sigma = -0.3, 0.6
    v_d, v_g = DATA_STD**2 + sigma**2, 1.3
    gen_std = math.sqrt(v_g - sigma**2)
    grid = torch.linspace(-25.0, 25.0, 100_001, dtype=torch.float64)
    spacing = (grid[1] - grid[0]).item()

    def log_density(y, mean, variance):
        return -0.5 * (y - mean) ** 2 / variance - 0.5 * math.log(2 * math.pi * variance)

    def divergence(theta_value):
        log_ratio = log_density(grid, DATA_MEAN, v_d) - log_density(grid, theta_value, v_g)
        return torch.trapezoid(log_density(grid, theta_value, v_g).exp() * f_divergence(name).f(log_ratio.exp()),
                               dx=spacing).item()

    step = 1e-4
    slope = (divergence(theta + step) - divergence(theta - step)) / (2 * step)

    log_ratio = log_density(grid, DATA_MEAN, v_d) - log_density(grid, theta, v_g)
    quadrature = log_density(grid, theta, v_g).exp() * spacing * len(grid)  # x len: the loss averages the batch
    weight = quadrature * f_divergence_weight(name, log_ratio, normalize=False)
    theta_tensor = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    x = theta_tensor + (grid - theta)[:, None]  # samples that move one-for-one with theta, at the grid points
    real = _gaussian_denoiser(DATA_MEAN, DATA_STD, sigma)(grid[:, None])
    fake = _gaussian_denoiser(theta, gen_std, sigma)(grid[:, None])
    dmd_generator_loss(x, real, fake, weight, normalize=False).backward()
    assert theta_tensor.grad.item() == pytest.approx(sigma**2 * slope, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Consistency models
# ---------------------------------------------------------------------------------------------

def test_consistency_parametrization_boundary_and_values():
    c_skip, c_out = consistency_parametrization(0.002, sigma_min=0.002, sigma_data=0.5)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    sigma = torch.tensor([0.01, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out = consistency_parametrization(sigma)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, (sigma - 0.002) * 0.5 / torch.sqrt(sigma**2 + 0.25))
    with pytest.raises(ValueError, match="sigma must be >= sigma_min"):
        consistency_parametrization(0.001)


def test_consistency_loss_l2_and_pseudo_huber_references():
    student, target = _randn(*ODD_SHAPE, seed=1, requires_grad=True), _randn(*ODD_SHAPE, seed=2)
    squared = _naive_sum_squares(student, target)
    torch.testing.assert_close(consistency_loss(student, target), sum(squared) / 3)
    c = 0.00054 * math.sqrt(2 * 5 * 7)  # the default: 0.00054 sqrt(elements per example)
    expected = sum(torch.sqrt(s + c * c) - c for s in squared) / 3
    torch.testing.assert_close(consistency_loss(student, target, "pseudo_huber"), expected)
    weight = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(consistency_loss(student, target, weight=weight),
                               (squared[0] + 3 * squared[2]) / 3)
    for kind in ("l2", "pseudo_huber"):
        assert consistency_loss(target, target.clone(), kind).item() == 0.0
        small_target = _randn(3, 2, 2, seed=5)
        assert torch.autograd.gradcheck(lambda s: consistency_loss(s, small_target, kind, c=0.1),
                                        (_randn(3, 2, 2, seed=4, requires_grad=True),))


def test_consistency_loss_detaches_target_and_pseudo_huber_limits():
    student, target = _randn(2, 6, seed=1, requires_grad=True), _randn(2, 6, seed=2, requires_grad=True)
    consistency_loss(student, target, "pseudo_huber").backward()
    assert target.grad is None and student.grad is not None
    tiny = 1e-3 * _randn(4, 10, seed=3)
    zero = torch.zeros_like(tiny)
    c = 1.0  # |difference| << c: ~ ||d||^2 / (2c)
    assert consistency_loss(tiny, zero, "pseudo_huber", c=c).item() == pytest.approx(
        consistency_loss(tiny, zero).item() / (2 * c), rel=1e-5)
    large = 1e3 * _randn(4, 10, seed=3)  # |difference| >> c: ~ ||d|| - c
    expected = large.norm(dim=1).mean().item() - 1e-3
    assert consistency_loss(large, zero, "pseudo_huber", c=1e-3).item() == pytest.approx(expected, rel=1e-9)


def test_consistency_loss_bad_inputs():
    a, b = _randn(2, 3), _randn(2, 3)
    with pytest.raises(ValueError, match="kind must be one of l2, pseudo_huber"):
        consistency_loss(a, b, "lpips")
    with pytest.raises(ValueError, match="c must be"):
        consistency_loss(a, b, "pseudo_huber", c=0.0)
    with pytest.raises(ValueError, match="weight must be an \\[N\\] tensor"):
        consistency_loss(a, b, weight=torch.ones(3))
    with pytest.raises(ValueError, match="target_output"):
        consistency_loss(a, _randn(3, 3))


# ---------------------------------------------------------------------------------------------
# Progressive distillation
# ---------------------------------------------------------------------------------------------

def test_progressive_target_reproduces_two_teacher_steps_in_one():
    x_t = 3.0 * _randn(4, 2, 3, seed=1)
    sigma_t = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    sigma_mid = sigma_t / 2
    sigma_s = torch.tensor([1.0, 0.2, 0.0, 0.0], dtype=torch.float64)
    teacher = lambda x, sigma: 0.3 + 0.25 / (0.25 + sigma.reshape(-1, 1, 1) ** 2) * (x - 0.3)  # noqa: E731
    teacher_x_s = ode_step(teacher, ode_step(teacher, x_t, sigma_t, sigma_mid, "ddim"), sigma_mid, sigma_s, "ddim")
    target = progressive_distillation_target(x_t, sigma_t, sigma_s, teacher_x_s)
    student_x_s = ode_step(lambda x, sigma: target, x_t, sigma_t, sigma_s, "ddim")
    torch.testing.assert_close(student_x_s, teacher_x_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target[2:], teacher_x_s[2:])  # sigma_s = 0: the target is the teacher's sample
    # The other form of the same solution.
    view = lambda s: s.reshape(-1, 1, 1)  # noqa: E731
    torch.testing.assert_close(target, x_t - view(sigma_t) * (teacher_x_s - x_t) / (view(sigma_s) - view(sigma_t)))


def test_progressive_target_gradcheck_and_bad_levels():
    x_t, teacher_x_s = _randn(2, 3, seed=1, requires_grad=True), _randn(2, 3, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: progressive_distillation_target(a, 2.0, 0.5, b), (x_t, teacher_x_s))
    with pytest.raises(ValueError, match="sigma_s"):
        progressive_distillation_target(x_t, 1.0, 1.0, teacher_x_s)
    with pytest.raises(ValueError, match="sigma_s"):
        progressive_distillation_target(x_t, 1.0, -0.1, teacher_x_s)
    with pytest.raises(ValueError, match="sigma_t must be a number or an \\[N\\] tensor"):
        progressive_distillation_target(x_t, torch.ones(3), 0.0, teacher_x_s)


def test_registry_is_documented():
    objectives = [spec for spec in specs("diffusion") if spec.is_objective]
    assert [spec.name for spec in objectives] == ["edm_denoising", "flow_matching", "dmd_generator", "consistency"]
    for spec in specs("diffusion") + specs("f_divergence"):  # `distill losses` shows each formula and paper
        assert spec.formula and spec.paper
    assert all(callable(spec.fn) and spec.fn.__doc__ for spec in objectives)
    # a recipe can name each f-divergence
    from distill.diffusion.recipe import DiffusionObjectiveSpec
    for name in F_DIVERGENCE_NAMES:
        assert DiffusionObjectiveSpec(divergence=name).divergence == name
