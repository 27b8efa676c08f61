"""Differentially private students: DP-SGD (Abadi et al. 2016) through opacus, for any family's trainer.

Each step draws a Poisson batch (every training row independently with probability q = batch_size / n,
seeded by (seed, step): a resumed run draws the same batches), computes each row's own gradient
(the trainer backpropagates one row at a time, which works for every model, loss and regime), and
hands the per-row gradients to opacus' `DPOptimizer`: each is clipped to `max_grad_norm`, they are
summed, Gaussian noise of standard deviation noise_multiplier * max_grad_norm is added, and the sum is
divided by the expected batch size before the wrapped optimizer steps. opacus' RDP accountant tracks
the privacy spent; with `epsilon` given, the noise multiplier is the smallest that keeps the whole
run (train.steps at rate q) within (epsilon, delta).

What is protected: the student's weights (and anything computed from them) are (epsilon, delta)-DP
with respect to adding or removing one training row. The teacher's signals on a row (its logits,
its scores of the student's samples in OPD) enter only through that row's clipped gradient, so they
are covered too, *provided the teacher itself is public*. Not protected: the teacher (trained on the
private data, it leaks that data by itself), a top-k cache of the teacher's outputs on the private
rows (it is private data: keep it with them), and the evaluation rows and their metrics.
"""
from __future__ import annotations

import math
import torch

from distill.core.errors import DistillError


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling's rate, batch_size / num_examples; a batch as large as the data is refused."""
    if batch_size >= num_examples:
        raise DistillError(f"the batch ({batch_size}) is not smaller than the training set ({num_examples}): "
                           "DP-SGD's privacy comes from sampling", field="train.batch_size",
                           fix="use a batch size well below the number of training rows")
    return batch_size / num_examples


def noise_for(settings, rate: float, steps: int) -> float:
    """The settings' noise multiplier, or the least that keeps `steps` steps at `rate` within their epsilon."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=settings.epsilon, target_delta=settings.delta,
                                          sample_rate=rate, steps=steps, accountant="rdp", epsilon_tolerance=0.01))
    except ValueError as error:
        raise DistillError(f"no noise level reaches epsilon {settings.epsilon} at delta {settings.delta} over {steps} "
                           f"steps: {error}", field="train.privacy.epsilon",
                           fix="raise epsilon or delta, or train fewer steps") from None


def epsilon_of(history: list[tuple], delta: float) -> float:
    """The epsilon opacus' RDP accountant gives for `history` ((noise, rate, steps) entries) at `delta`."""
    if not history:
        return 0.0
    import warnings

    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a valid, looser bound (low noise)
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def summary_of(settings, noise: float, rate: float, history: list[tuple]) -> dict:
    """What the report states of a private phase."""
    epsilon = epsilon_of(history, settings.delta)
    return {"epsilon": round(epsilon, 4) if math.isfinite(epsilon) else epsilon, "delta": settings.delta,
            "noise_multiplier": round(noise, 4), "sample_rate": rate, "max_grad_norm": settings.max_grad_norm,
            "steps": int(sum(entry[2] for entry in history)), "accountant": "opacus RDP"}


class PrivateTraining:
    """DP-SGD state of one training phase: the noise multiplier, the DP optimizer, the accountant."""

    def __init__(self, settings, optimizer: torch.optim.Optimizer, *, num_examples: int, batch_size: int,
                 steps: int, seed: int):
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        self.settings, self.seed, self.num_examples = settings, seed, num_examples
        self.sample_rate = sample_rate(batch_size, num_examples)
        self.noise_multiplier = noise_for(settings, self.sample_rate, steps)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=settings.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean")
        self.accountant = RDPAccountant()
        self.last_clipped = 0.0  # the fraction of the last step's rows whose gradient was clipped
        self._epsilon: tuple = (None, 0.0)  # (the history it was computed for, epsilon)

    def batch(self, step: int) -> list[int]:
        """The Poisson batch of `step`: each row with probability q, from a generator seeded by (seed, step)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.nonzero(torch.rand(self.num_examples, generator=generator) < self.sample_rate).flatten().tolist()

    def store(self, per_row: list[dict[torch.nn.Parameter, torch.Tensor]]) -> None:
        """Set every parameter's `grad_sample` ([rows, *shape]) from the rows' gradients (zero where a row's
        loss did not reach a parameter)."""
        for p in self.optimizer.params:
            p.grad_sample = torch.stack([row.get(p, torch.zeros_like(p)) for row in per_row]) if per_row \
                else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def step(self, step: int) -> None:
        """Clip each row's gradient, add noise (seeded by the step), average, step; account for the step."""
        samples = self.optimizer.grad_samples
        if samples and len(samples[0]):
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            self.last_clipped = float((norms > self.settings.max_grad_norm).float().mean())
        else:
            self.last_clipped = 0.0
        self.optimizer.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7_919)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """The epsilon spent so far (at the settings' delta), by opacus' RDP accountant."""
        key = tuple(tuple(entry) for entry in self.accountant.history)
        if self._epsilon[0] != key:
            self._epsilon = (key, epsilon_of(self.accountant.history, self.settings.delta))
        return self._epsilon[1]

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(entry) for entry in state.get("history", [])]

    def summary(self) -> dict:
        return summary_of(self.settings, self.noise_multiplier, self.sample_rate, self.accountant.history)


def privacy_note(row: str, summary: dict) -> str:
    return (f"{row}: ({summary['epsilon']:.3g}, {summary['delta']:.0e})-differentially private with respect to "
            f"each training row (DP-SGD by opacus: per-row gradients clipped to {summary['max_grad_norm']}, noise "
            f"multiplier {summary['noise_multiplier']:.3g}, {summary['steps']} steps at sampling rate "
            f"{summary['sample_rate']:.3g}, RDP accountant); the teacher is assumed public")


def spent(settings, *, num_examples: int, batch_size: int, steps: int) -> dict:
    """The summary a finished phase of these settings reports (the accounting is deterministic): for a phase
    that finished before a resumed run, whose trainer did not run again."""
    rate = sample_rate(batch_size, num_examples)
    noise = noise_for(settings, rate, steps)
    return summary_of(settings, noise, rate, [(noise, rate, steps)])
