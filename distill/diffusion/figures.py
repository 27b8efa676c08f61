"""The diffusion family's figures in a run's report (core.report puts them after the loss and eval
curves): the samples of every row side by side, and quality against network evaluations per sample."""
from __future__ import annotations

from pathlib import Path

import torch

from distill.core.report import pyplot


def plot_samples(samples: dict[str, torch.Tensor], task, path: Path) -> Path:
    """One panel per row (at most 5 a line): 2-D points over the mixture's mode centres, or a 6x6 grid of
    images."""
    plt = pyplot()
    names = list(samples)
    columns = min(len(names), 5)
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        x = samples[name]
        if x.dim() == 2:
            means = task.mixture.means
            axis.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            axis.scatter(means[:, 0], means[:, 1], s=12, c="red", marker="x")
            axis.set_xlim(-3, 3)
            axis.set_ylim(-3, 3)
        else:
            tiles = torch.nn.functional.pad((x[:36, 0].clamp(-1, 1) + 1) / 2, (1, 1, 1, 1))  # a blank border each
            grid = tiles.reshape(6, 6, *tiles.shape[1:]).permute(0, 2, 1, 3).reshape(6 * tiles.shape[1], -1)
            axis.imshow(grid, cmap="gray_r")
            axis.axis("off")
        axis.set_title(name, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_quality_vs_steps(rows: dict[str, dict], metric: str, path: Path) -> Path | None:
    """The metric against network evaluations per sample, a line per sampler (`teacher euler`, `student
    consistency`), the noise floor dashed: where the students meet the teacher."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for name, row in rows.items():
        if row.get("function_evaluations") and metric in row:
            lines.setdefault(name.rsplit(" ", 1)[0], []).append((row["function_evaluations"], row[metric]))
    if not lines:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for label, points in lines.items():
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    floor = next((row[metric] for name, row in rows.items() if name.startswith("data")), None)
    if floor is not None:
        axis.axhline(floor, color="gray", linestyle="--", label="data (noise floor)")
    axis.set_xscale("log", base=2)
    values = [v for points in lines.values() for _, v in points] + ([floor] if floor is not None else [])
    if min(values) > 0:  # an unbiased MMD can dip below 0 at the noise floor: then a linear axis
        axis.set_yscale("log")
    axis.set_xlabel("network evaluations per sample")
    axis.set_ylabel(f"{metric} (lower is better)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
