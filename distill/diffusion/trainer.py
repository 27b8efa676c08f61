"""Few-step and one-step students of a many-step diffusion teacher (all in EDM's sigma convention,
distill/diffusion/sampler.py). Every trainer reads top to bottom and takes the data as a sampler
`sample_data(n, generator) -> x0 [n, ...]`; the teacher is any denoiser `D(x, sigma)` (a trained network,
or gmm2d's exact one).

- `train_denoiser`: the teacher itself, EDM denoising loss with log-normal sigma (Karras et al. 2022).
- `train_dmd`: one-step generator G(z) = D_G(sigma_max z, sigma_max), started from the teacher. Per
  generator update, `fake_updates` updates of a fake denoiser on the generator's own samples (two
  time-scale, DMD2); the generator gradient is the difference of the fake and real (teacher) denoisers
  at noised generator samples, weighted per sample by an f-divergence weight h(r) whose density ratio
  r = p_data / p_gen comes from a discriminator trained on noised data vs noised generator samples
  (f-distill; reverse KL = plain DMD, h = 1); optional regression on teacher ODE pairs (DMD) and a
  non-saturating GAN term (DMD2).
- `train_consistency`: consistency distillation (Song et al. 2023): the student at sigma_{n+1} matches the
  EMA target at the teacher's one ODE step down to sigma_n.
- `train_progressive`: progressive distillation (Salimans & Ho 2022): each round, one student step does
  what two steps of the previous round's model did; the step count halves every round.

The students' trainers are given a `Tracker` (distill/diffusion/tracking.py) that records losses, evaluates
and checkpoints everything that changes during training (networks, optimizers, the data generator), and
on resume restores it: a killed and resumed run ends with the same weights, bit for bit.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill.diffusion.sampler import few_step_sigmas, karras_level, ode_step, sample_ode
from distill.diffusion.tracking import Tracker
from distill.losses.diffusion import (consistency_loss, consistency_parametrization, dmd_generator_loss,
                                      edm_denoising_loss, edm_preconditioning, progressive_distillation_target)
from distill.losses.f_divergence import f_divergence_weight

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass
class Schedule:
    """The noise range every model shares (EDM defaults scaled to the data)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def sigmas(self, steps: int) -> torch.Tensor:
        """A sampling schedule of `steps` steps that all count (few_step_sigmas: Karras et al.'s spacing,
        nested across step counts), ending at 0, in float32 (the models' dtype)."""
        return few_step_sigmas(steps, self.sigma_min, self.sigma_max, self.rho).float()

    def level(self, position: torch.Tensor, levels: int) -> torch.Tensor:
        """The noise level at a (fractional) position in Karras et al.'s `levels`-level discretisation:
        position 0 is sigma_max, position levels - 1 is sigma_min, integer positions are karras_sigmas(levels)."""
        return karras_level(position / (levels - 1), self.sigma_min, self.sigma_max, self.rho)


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _per_example(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape((-1,) + (1,) * (x.dim() - 1))


def _log_uniform_sigma(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand(n, generator=generator))


def _bar(total: int, phase: str):
    return tqdm(total=total, desc=phase, dynamic_ncols=True, leave=False, mininterval=1.0)


# ---- the teacher --------------------------------------------------------------------------------

def train_denoiser(model: nn.Module, sample_data: Sampler, *, steps: int, batch_size: int = 256, lr: float = 1e-3,
                   p_mean: float = -1.2, p_std: float = 1.2, ema_decay: float | None = None, seed: int = 0,
                   tracker: Tracker | None = None) -> nn.Module:
    """EDM training: ln sigma ~ N(p_mean, p_std^2), loss lambda(sigma) ||D(x0 + sigma eps, sigma) - x0||^2.
    With `ema_decay`, the returned weights are the exponential moving average of the trained ones (the
    usual practice for image diffusion models: the average samples better than the last iterate)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    average = copy.deepcopy(model).requires_grad_(False) if ema_decay is not None else None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    bar = _bar(steps, "teacher")
    for step in range(1, steps + 1):
        x0 = sample_data(batch_size, generator)
        sigma = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=generator))
        noised = x0 + _per_example(sigma, x0) * _noise_like(x0, generator)
        loss = edm_denoising_loss(model(noised, sigma), x0, sigma, model.sigma_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            with torch.no_grad():
                for averaged, value in zip(average.parameters(), model.parameters()):
                    averaged.lerp_(value, 1 - ema_decay)
        bar.update(1)
        if tracker is not None:
            tracker.log(step, steps, loss=loss.detach())
    bar.close()
    if average is not None:
        model.load_state_dict(average.state_dict())
    return model.eval()


# ---- DMD: one-step generator by distribution matching ----------------------------------------------

class Discriminator(nn.Module):
    """logit(x_sigma, sigma) ~ log p_data,sigma(x) / p_gen,sigma(x): a small MLP on flattened inputs with the
    noise level as an extra input (enough for 2-D mixtures and 8x8 digits)."""

    def __init__(self, data_shape: tuple[int, ...], sigma_data: float, hidden: int = 128):
        super().__init__()
        self.sigma_data = sigma_data
        width = math.prod(data_shape)
        self.net = nn.Sequential(nn.Linear(width + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        flat = x.flatten(1) * c_in[:, None]
        return self.net(torch.cat([flat, c_noise[:, None].to(flat.dtype)], dim=1)).squeeze(1)


def one_step(generator_model: Denoiser, z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """A one-step generator's sample: its denoiser at sigma_max on z * sigma_max (z unit Gaussian)."""
    return generator_model(z * sigma_max, torch.full((z.shape[0],), sigma_max))


@dataclass
class DMDSpec:
    divergence: str = "reverse_kl"  # f-divergence weighting of the generator gradient (reverse_kl: plain DMD)
    steps: int = 2000  # generator updates
    batch_size: int = 128
    lr: float = 5e-4
    fake_lr: float = 5e-4
    fake_updates: int = 5  # fake-denoiser (and discriminator) updates per generator update
    sigma_low: float = 0.02  # noise levels of the generator loss and of the fake score's training: log-uniform
    sigma_high: float | None = None  # in [sigma_low, sigma_high]; None: the schedule's sigma_max (DMD: t ~ U(0.02T, 0.98T))
    regression_weight: float = 0.0  # DMD: ||G(z) - teacher ODE(z)||^2 on fixed pairs
    regression_pairs: int = 512
    teacher_steps: int = 32  # Heun steps of the teacher ODE for the regression pairs
    gan_weight: float = 0.0  # DMD2: non-saturating GAN term through the discriminator
    weight_groups: int = 8  # f-weights are normalised within this many groups of nearby noise levels
    seed: int = 0


def train_dmd(teacher: Denoiser, generator_model: nn.Module, sample_data: Sampler, spec: DMDSpec, schedule: Schedule,
              *, tracker: Tracker | None = None) -> nn.Module:
    """Distribution matching distillation into a one-step generator; returns it (eval mode). With a
    tracker: loss records, evaluations of the generator and checkpoints (resumed from, if asked)."""
    tracker = tracker or Tracker()
    rng = torch.Generator().manual_seed(spec.seed)
    probe = sample_data(2, rng)
    data_shape = tuple(probe.shape[1:])
    fake = copy.deepcopy(generator_model).train()
    with torch.random.fork_rng():  # its init depends on the seed alone, not on what ran before
        torch.manual_seed(spec.seed)
        discriminator = Discriminator(data_shape, generator_model.sigma_data)
    needs_ratio = spec.divergence != "reverse_kl" or spec.gan_weight > 0
    g_optimizer = torch.optim.Adam(generator_model.parameters(), lr=spec.lr, betas=(0.0, 0.99))
    f_optimizer = torch.optim.Adam(fake.parameters(), lr=spec.fake_lr, betas=(0.0, 0.99))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=spec.fake_lr, betas=(0.0, 0.99))
    pairs = None
    if spec.regression_weight > 0:  # (z, teacher ODE(z)) once, as in DMD
        z = torch.randn((spec.regression_pairs, *data_shape), generator=rng)
        with torch.no_grad():
            pairs = (z, sample_ode(teacher, z, schedule.sigmas(spec.teacher_steps), "heun"))
    sigma_high = spec.sigma_high if spec.sigma_high is not None else schedule.sigma_max
    # Everything that changes during training; the regression pairs above are drawn again, identically.
    resumable = dict(modules={"generator": generator_model, "fake": fake, "discriminator": discriminator},
                     optimizers={"generator": g_optimizer, "fake": f_optimizer, "discriminator": d_optimizer},
                     generators={"data": rng})
    done = tracker.restore(**resumable)
    generator_model.train()
    bar = _bar(spec.steps, f"dmd {spec.divergence}")
    bar.update(done)
    for step in range(done + 1, spec.steps + 1):
        started = time.perf_counter()
        for _ in range(spec.fake_updates):  # the fake score follows the generator (two time-scale)
            with torch.no_grad():
                x = one_step(generator_model, torch.randn((spec.batch_size, *data_shape), generator=rng),
                             schedule.sigma_max)
            sigma = _log_uniform_sigma(spec.batch_size, spec.sigma_low, sigma_high, rng)
            noised = x + _per_example(sigma, x) * _noise_like(x, rng)
            fake_loss = edm_denoising_loss(fake(noised, sigma), x, sigma, fake.sigma_data)
            f_optimizer.zero_grad(set_to_none=True)
            fake_loss.backward()
            f_optimizer.step()
            if needs_ratio:  # logistic regression, data = 1, generator = 0: logit -> log p_data / p_gen
                real = sample_data(spec.batch_size, rng)
                real_noised = real + _per_example(sigma, real) * _noise_like(real, rng)
                d_loss = (F.softplus(-discriminator(real_noised, sigma)).mean()
                          + F.softplus(discriminator(noised, sigma)).mean())
                d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                d_optimizer.step()
        z = torch.randn((spec.batch_size, *data_shape), generator=rng)
        x = one_step(generator_model, z, schedule.sigma_max)
        sigma = _log_uniform_sigma(spec.batch_size, spec.sigma_low, sigma_high, rng)
        noised = x + _per_example(sigma, x) * _noise_like(x, rng)
        with torch.no_grad():
            real_denoised, fake_denoised = teacher(noised, sigma), fake(noised, sigma)
        weight, values = None, {}
        if spec.divergence != "reverse_kl":
            with torch.no_grad():
                log_ratio = discriminator(noised, sigma)
            weight = torch.empty_like(log_ratio)
            # h(r) / mean h(r) among examples of similar noise level (f-distill normalises per level): at
            # large sigma r ~ 1 everywhere, so one batch-wide mean would hand the whole gradient to the few
            # small-sigma examples with extreme ratios.
            for group in torch.argsort(sigma).chunk(spec.weight_groups):
                weight[group] = f_divergence_weight(spec.divergence, log_ratio[group], max_abs_log_ratio=10.0)
            values["weight_max"] = weight.max()
        loss = dmd_generator_loss(x, real_denoised, fake_denoised, weight)
        values["dmd"] = loss.detach()
        if pairs is not None:
            index = torch.randint(0, pairs[0].shape[0], (spec.batch_size,), generator=rng)
            regression = F.mse_loss(one_step(generator_model, pairs[0][index], schedule.sigma_max), pairs[1][index])
            loss = loss + spec.regression_weight * regression
            values["regression"] = regression.detach()
        if spec.gan_weight > 0:
            gan = F.softplus(-discriminator(noised, sigma)).mean()  # non-saturating: fool the discriminator
            loss = loss + spec.gan_weight * gan
            values["gan"] = gan.detach()
        g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        g_optimizer.step()
        bar.update(1)
        tracker.log(step, spec.steps, loss=loss.detach(), fake=fake_loss.detach(), **values,
                    step_seconds=time.perf_counter() - started)
        tracker.evaluate(step, spec.steps, generator_model)
        tracker.checkpoint(step, spec.steps, **resumable)
    bar.close()
    return generator_model.eval()


# ---- consistency distillation ---------------------------------------------------------------------

class ConsistencyModel(nn.Module):
    """f(x, sigma) = c_skip_cm(sigma) x + c_out_cm(sigma) F(c_in x, c_noise), F the raw network of an EDM
    denoiser: started from the teacher it is close to the teacher's denoiser, and f(x, sigma_min) = x exactly."""

    def __init__(self, denoiser: nn.Module, sigma_min: float):
        super().__init__()
        self.denoiser, self.sigma_min, self.sigma_data = denoiser, sigma_min, denoiser.sigma_data

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = self.denoiser.sigma_per_example(x, sigma)
        c_skip, c_out = consistency_parametrization(sigma, self.sigma_min, self.sigma_data)
        _, _, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        raw = self.denoiser.network(x * _per_example(c_in, x).to(x.dtype), c_noise)
        return _per_example(c_skip, x).to(x.dtype) * x + _per_example(c_out, x).to(x.dtype) * raw


@torch.no_grad()
def consistency_sample(model: Denoiser, z: torch.Tensor, steps: int, schedule: Schedule,
                       generator: torch.Generator) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x = f(sigma_0 z, sigma_0), then `steps - 1`
    times re-noise to the next level (variance sigma^2 - sigma_min^2) and map back with f. The levels are the
    first `steps` of a Karras schedule of `steps + 1` steps (Schedule.sigmas): sigma_max and levels strictly
    above sigma_min."""
    levels = schedule.sigmas(steps)[:steps].tolist()
    x = model(z * levels[0], torch.full((z.shape[0],), levels[0]))
    for sigma in levels[1:]:
        noised = x + math.sqrt(sigma ** 2 - schedule.sigma_min ** 2) * _noise_like(x, generator)
        x = model(noised, torch.full((z.shape[0],), sigma))
    return x


@dataclass
class ConsistencySpec:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-4
    discretization: int = 18  # N: one teacher step spans 1 / (N - 1) of the Karras ramp
    ema_decay: float = 0.95  # target network (consistency distillation's mu)
    loss: str = "l2"  # l2 | pseudo_huber
    ode_method: str = "heun"  # the teacher's one step
    seed: int = 0


def train_consistency(teacher: Denoiser, student: ConsistencyModel, sample_data: Sampler, spec: ConsistencySpec,
                      schedule: Schedule, *, tracker: Tracker | None = None) -> ConsistencyModel:
    """Consistency distillation; returns the student (eval mode). With a tracker: loss records,
    evaluations of the student and checkpoints (resumed from, if asked)."""
    tracker = tracker or Tracker()
    rng = torch.Generator().manual_seed(spec.seed)
    levels = spec.discretization
    target = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=spec.lr)
    resumable = dict(modules={"student": student, "target": target}, optimizers={"student": optimizer},
                     generators={"data": rng})
    done = tracker.restore(**resumable)
    student.train()
    bar = _bar(spec.steps, "consistency")
    bar.update(done)
    for step in range(done + 1, spec.steps + 1):
        x0 = sample_data(spec.batch_size, rng)
        # Adjacent levels of the N-level Karras discretisation, at a random fractional offset: the student
        # meets every noise level, so multistep sampling may re-noise to levels between the grid points
        # (trained on the grid alone, a 2-step sample through sigma 1.43, between grid levels 1.11 and 1.83,
        # landed 20% of points near a mode against 53% for one step; gmm2d, seed 0).
        position = (levels - 2) * torch.rand(spec.batch_size, generator=rng)
        sigma_high = schedule.level(position, levels)
        sigma_low = schedule.level(position + 1, levels).clamp(min=schedule.sigma_min)  # float rounding at the end
        noised = x0 + _per_example(sigma_high, x0) * _noise_like(x0, rng)
        with torch.no_grad():
            stepped = ode_step(teacher, noised, sigma_high, sigma_low, spec.ode_method)
            target_output = target(stepped, sigma_low)
        loss = consistency_loss(student(noised, sigma_high), target_output, spec.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # target <- EMA of the student
            for target_value, value in zip(target.parameters(), student.parameters()):
                target_value.mul_(spec.ema_decay).add_(value, alpha=1 - spec.ema_decay)
        bar.update(1)
        tracker.log(step, spec.steps, loss=loss.detach())
        tracker.evaluate(step, spec.steps, student)
        tracker.checkpoint(step, spec.steps, **resumable)
    bar.close()
    return student.eval()


# ---- progressive distillation ---------------------------------------------------------------------

@dataclass
class ProgressiveSpec:
    start_steps: int = 64  # the teacher's DDIM step count; each round halves it
    final_steps: int = 1
    steps_per_round: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    seed: int = 0


def train_progressive(teacher: Denoiser, sample_data: Sampler, spec: ProgressiveSpec, schedule: Schedule,
                      *, student: nn.Module | None = None, tracker: Tracker | None = None,
                      keep: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Progressive distillation from `start_steps` DDIM steps down to `final_steps`; returns the last student.
    The first round's student starts from `student` (default: a copy of the teacher network), later rounds
    from the previous round's student. `keep(step_count, model)` is called after every round (e.g. to save
    the 4- and 2-step students). Steps are counted over all rounds (round r holds steps r * steps_per_round
    + 1 ...), so a tracker's records and checkpoints of different rounds never share a step; a resumed run
    continues inside the round its checkpoint was written in."""
    if spec.start_steps & (spec.start_steps - 1) or spec.final_steps < 1 or spec.start_steps % spec.final_steps:
        raise ValueError(f"start_steps ({spec.start_steps}) must be a power of two and a multiple of final_steps "
                         f"({spec.final_steps})")
    tracker = tracker or Tracker()
    rng = torch.Generator().manual_seed(spec.seed)
    rounds = [spec.start_steps >> k for k in range(1, spec.start_steps.bit_length())
              if spec.start_steps >> k >= spec.final_steps]
    start = student if student is not None else teacher
    current_teacher = teacher
    saved = tracker.saved_state()
    first_round = saved["round"] if saved is not None else 0
    if first_round > 0:  # the previous round's student teaches the round we continue (its weights: below)
        current_teacher = copy.deepcopy(start).eval().requires_grad_(False)
    per_round = spec.steps_per_round
    for round_index, student_steps in enumerate(rounds):
        if round_index < first_round:
            continue  # finished before the interruption (kept then)
        teacher_grid = schedule.sigmas(2 * student_steps)
        student = copy.deepcopy(start).train().requires_grad_(True)
        optimizer = torch.optim.Adam(student.parameters(), lr=spec.lr)
        # Everything that changes during a round; the round's teacher is the previous round's student.
        modules = {"student": student, **({"round_teacher": current_teacher} if round_index else {})}
        resumable = dict(modules=modules, optimizers={"student": optimizer}, generators={"data": rng})
        done = round_index * per_round
        if saved is not None and round_index == first_round:
            done = tracker.restore(**resumable)
        last = (round_index + 1) * per_round
        bar = _bar(per_round, f"progressive {2 * student_steps}->{student_steps}")
        bar.update(done - round_index * per_round)
        for step in range(done + 1, last + 1):
            x0 = sample_data(spec.batch_size, rng)
            index = 2 * torch.randint(0, student_steps, (spec.batch_size,), generator=rng)
            sigma_t, sigma_mid, sigma_s = teacher_grid[index], teacher_grid[index + 1], teacher_grid[index + 2]
            x_t = x0 + _per_example(sigma_t, x0) * _noise_like(x0, rng)
            with torch.no_grad():
                x_mid = ode_step(current_teacher, x_t, sigma_t, sigma_mid, "ddim")
                x_s = ode_step(current_teacher, x_mid, sigma_mid, sigma_s, "ddim")
                target = progressive_distillation_target(x_t, sigma_t, sigma_s, x_s)
            loss = edm_denoising_loss(student(x_t, sigma_t), target, sigma_t, student.sigma_data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            tracker.log(step, last, loss=loss.detach(), student_steps=student_steps)
            tracker.evaluate(step, last, student, sampling_steps=student_steps)
            tracker.checkpoint(step, last, **resumable, state={"round": round_index, "student_steps": student_steps})
        bar.close()
        student.eval().requires_grad_(False)
        if keep is not None:
            keep(student_steps, student)
        current_teacher, start = student, student
    return student
