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
from dataclasses import dataclass

import torch

from distill.core.errors import DistillError


@dataclass
class PrivacySettings:
    epsilon: float | None
    delta: float
    max_grad_norm: float
    noise_multiplier: float | None = None


class PrivateTraining:
    """DP-SGD state of one training phase: the noise multiplier, the DP optimizer, the accountant."""

    def __init__(self, settings, optimizer: torch.optim.Optimizer, *, num_examples: int, batch_size: int,
                 steps: int, seed: int):
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        if batch_size >= num_examples:
            raise DistillError(f"the batch ({batch_size}) is not smaller than the training set ({num_examples}): "
                               "DP-SGD's privacy comes from sampling", field="train.batch_size",
                               fix="use a batch size well below the number of training rows")
        self.settings, self.seed = settings, seed
        self.sample_rate = batch_size / num_examples
        self.num_examples, self.batch_size, self.steps = num_examples, batch_size, steps
        if settings.noise_multiplier is not None:
            self.noise_multiplier = float(settings.noise_multiplier)
        else:
            try:
                self.noise_multiplier = float(get_noise_multiplier(
                    target_epsilon=settings.epsilon, target_delta=settings.delta, sample_rate=self.sample_rate,
                    steps=steps, accountant="rdp", epsilon_tolerance=0.01))
            except ValueError as error:
                raise DistillError(f"no noise level reaches epsilon {settings.epsilon} at delta {settings.delta} "
                                   f"over {steps} steps: {error}", field="train.privacy.epsilon",
                                   fix="raise epsilon or delta, or train fewer steps") from None
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=settings.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean")
        self.accountant = RDPAccountant()
        self.last_clipped = 0.0  # the fraction of the last step's rows whose gradient was clipped

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
        if not self.accountant.history:
            return 0.0
        key = tuple(tuple(entry) for entry in self.accountant.history)
        if getattr(self, "_epsilon", (None,))[0] != key:
            import warnings

            with warnings.catch_warnings():  # "optimal order is the largest alpha": a valid, looser bound (low noise)
                warnings.simplefilter("ignore", UserWarning)
                self._epsilon = (key, float(self.accountant.get_epsilon(delta=self.settings.delta)))
        return self._epsilon[1]

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(entry) for entry in state.get("history", [])]

    def summary(self) -> dict:
        epsilon = self.epsilon()
        return {"epsilon": round(epsilon, 4) if math.isfinite(epsilon) else epsilon, "delta": self.settings.delta,
                "noise_multiplier": round(self.noise_multiplier, 4), "sample_rate": self.sample_rate,
                "max_grad_norm": self.settings.max_grad_norm,
                "steps": int(sum(entry[2] for entry in self.accountant.history)),
                "accountant": "opacus RDP"}


def privacy_note(row: str, summary: dict) -> str:
    return (f"{row}: ({summary['epsilon']:.3g}, {summary['delta']:.0e})-differentially private with respect to "
            f"each training row (DP-SGD by opacus: per-row gradients clipped to {summary['max_grad_norm']}, noise "
            f"multiplier {summary['noise_multiplier']:.3g}, {summary['steps']} steps at sampling rate "
            f"{summary['sample_rate']:.3g}, RDP accountant); the teacher is assumed public")


def spent(settings, *, num_examples: int, batch_size: int, steps: int) -> dict:
    """The summary a finished phase of these settings reports (the accounting is deterministic): for a phase
    that finished before a resumed run, whose trainer did not run again."""
    from opacus.accountants import RDPAccountant

    class Frozen(torch.optim.SGD):
        pass

    private = PrivateTraining(settings, Frozen([torch.nn.Parameter(torch.zeros(1))], lr=0.0),
                              num_examples=num_examples, batch_size=batch_size, steps=steps, seed=0)
    private.accountant = RDPAccountant()
    private.accountant.history = [(private.noise_multiplier, private.sample_rate, steps)]
    return private.summary()
