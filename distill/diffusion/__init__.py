"""Diffusion and flow-model distillation: a many-step teacher turned into a one- or few-step student. The noise
convention is EDM's (Karras et al. 2022): x_sigma = x_0 + sigma * eps with eps ~ N(0, I), a denoiser D(x, sigma)
estimates E[x_0 | x_sigma] and the score is grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2. The toy task with
an exact teacher is distill.diffusion.gmm2d; sample-quality metrics (mode coverage, MMD, sliced Wasserstein, Frechet
distance, precision/recall) live in distill.diffusion.metrics."""
