"""The built-in diffusion tasks: where training samples come from and how generated samples are scored.

- `gmm2d`: a 2-D Gaussian mixture (distill/diffusion/gmm2d.py); exact samples, the exact denoiser (an
  analytic teacher) and exact mode metrics against fresh exact samples.
- `digits`: scikit-learn's 1,797 8x8 digits scaled to [-1, 1]; Frechet distance and k-NN precision /
  recall in the feature space of the shipped digits classifier (`builtin:digits-teacher`, its 128-wide
  `fc_act` layer), against held-out digits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill.diffusion.metrics import frechet_distance, gmm_metrics, precision_recall
from distill.core.errors import DistillError
from distill.diffusion.gmm2d import GaussianMixture2D


@dataclass
class GMMTask:
    mixture: GaussianMixture2D
    eval_samples: int = 2000
    seed: int = 0
    name: str = "gmm2d"
    primary_metric: str = "mmd"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def sigma_data(self) -> float:
        return float(self.mixture.sigma_data)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.mixture.sample(n, generator)

    def evaluate(self, samples: torch.Tensor) -> dict:
        reference = self.mixture.sample(len(samples), torch.Generator().manual_seed(10_000 + self.seed))
        return gmm_metrics(samples, self.mixture, reference)

    def noise_floor(self) -> dict:
        """The metrics of exact samples: what a perfect generator scores."""
        return self.evaluate(self.mixture.sample(self.eval_samples, torch.Generator().manual_seed(20_000 + self.seed)))


@dataclass
class DigitsTask:
    eval_samples: int = 500
    seed: int = 0
    name: str = "digits"
    primary_metric: str = "fd"
    _train: torch.Tensor = field(init=False, repr=False)
    _held_out: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        from distill.classifier.data import load_image_task

        data = load_image_task("digits", eval_size=self.eval_samples, seed=self.seed)
        self._train, self._held_out = data.train_x * 2 - 1, data.eval_x * 2 - 1
        from distill.classifier.models import load_classifier

        self._classifier, _ = load_classifier("builtin:digits-teacher", "eval")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def sigma_data(self) -> float:
        return 0.5  # EDM's default; the data in [-1, 1] has std ~0.6

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._train[torch.randint(0, len(self._train), (n,), generator=generator)]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        from distill.core.hooks import FeatureTaps, forward

        taps = FeatureTaps(self._classifier, ["fc_act"])
        with taps:
            forward(self._classifier, ((images.clamp(-1, 1) + 1) / 2).float(), taps)
        return taps.features["fc_act"]

    def evaluate(self, samples: torch.Tensor) -> dict:
        real, fake = self.features(self._held_out), self.features(samples)
        precision, recall = precision_recall(real, fake)
        return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall}

    def noise_floor(self) -> dict:
        """Training digits against the held-out ones."""
        index = torch.randperm(len(self._train), generator=torch.Generator().manual_seed(self.seed))[:self.eval_samples]
        return self.evaluate(self._train[index])


def diffusion_task(builtin: str, *, modes: int = 8, imbalance: float = 10.0, radius: float = 2.0, std: float = 0.05,
                   eval_samples: int = 2000, seed: int = 0):
    """The task object of a recipe's `data` section."""
    if builtin == "gmm2d":
        return GMMTask(GaussianMixture2D.ring(modes, radius=radius, std=std, imbalance=imbalance), eval_samples, seed)
    if builtin == "digits":
        return DigitsTask(min(eval_samples, 500), seed)
    raise DistillError(f"no built-in diffusion task `{builtin}`", field="data.builtin", fix="use gmm2d or digits")
