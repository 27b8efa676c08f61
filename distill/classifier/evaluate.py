"""Classifier metrics on held-out data: accuracy, NLL, expected calibration error, agreement with the
teacher (top-1 and KL), parameters, and measured inference throughput."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.hooks import forward
from distill.core.metrics import count_parameters, median_seconds, teacher_agreement_sums


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean confidence(B_b)| over `bins` equal-width confidence
    bins of the top-1 probability (Guo et al. 2017). 0 = perfectly calibrated."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


def _slice(inputs, start: int, end: int):
    return {k: v[start:end] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[start:end]


@torch.no_grad()
def predict_logits(model: nn.Module, inputs, batch_size: int) -> torch.Tensor:
    """Logits of the whole set, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    size = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    logits = torch.cat([forward(model, _slice(inputs, start, start + batch_size)).float()
                        for start in range(0, size, batch_size)])
    model.train(was_training)
    return logits


@torch.no_grad()
def examples_per_second(model: nn.Module, inputs, batch_size: int, repeats: int = 3) -> float:
    """Measured inference throughput on one batch (core.metrics.median_seconds: median of `repeats` after a
    warm-up)."""
    batch = _slice(inputs, 0, batch_size)
    size = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
    was_training = model.training
    model.eval()
    seconds = median_seconds(lambda: forward(model, batch), repeats=repeats)
    model.train(was_training)
    return size / seconds


def evaluate_classifier(model: nn.Module, inputs, labels: torch.Tensor, *, batch_size: int, bins: int = 15,
                        teacher_logits: torch.Tensor | None = None, final: bool = False,
                        class_accuracy: list[int] | None = None) -> dict:
    """accuracy, nll, ece; with `teacher_logits`, top-1 agreement and KL(teacher || model); with `final`,
    parameters and examples/s; `class_accuracy` adds `accuracy_class_<c>` for those classes."""
    logits = predict_logits(model, inputs, batch_size)
    probs = logits.softmax(-1)
    metrics = {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
               "nll": F.cross_entropy(logits, labels).item(),
               "ece": expected_calibration_error(probs, labels, bins)}
    for label in class_accuracy or []:
        members = labels == label
        metrics[f"accuracy_class_{label}"] = (logits[members].argmax(-1) == label).float().mean().item()
    if teacher_logits is not None:
        agreement, kl = teacher_agreement_sums(logits.log_softmax(-1), teacher_logits.log_softmax(-1))
        metrics["teacher_top1_agreement"], metrics["teacher_kl"] = agreement / len(labels), kl / len(labels)
    if final:
        metrics["parameters"] = count_parameters(model)
        metrics["examples_per_second"] = examples_per_second(model, inputs, batch_size)
    return metrics
