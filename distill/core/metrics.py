"""Metrics every family reports the same way: size, agreement with the teacher, and measured speed."""
from __future__ import annotations

import time
from typing import Callable

import torch


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_agreement_sums(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> tuple[float, float]:
    """(number of rows where the argmaxes agree, sum over rows of KL(teacher || student)) for log-probs
    [rows, classes]: summed, so that batches add up; divide both by the number of rows."""
    agreement = (student_logprobs.argmax(-1) == teacher_logprobs.argmax(-1)).sum().item()
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1).sum().item()
    return float(agreement), float(kl)


def median_seconds(run: Callable[[], object], *, repeats: int = 3, warmup: Callable[[], object] | None = None) -> float:
    """Wall-clock seconds of `run`: the median of `repeats` calls after one warm-up call (`warmup`, or
    `run` itself). Every throughput in a report is measured this way."""
    (warmup or run)()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]
