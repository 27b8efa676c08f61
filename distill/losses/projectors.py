"""Projectors: learned maps from a student feature's shape to the teacher's, for the point-wise feature
losses (FitNets, cosine, ND) when widths differ. They are the only modules among the objectives: they
train with the student and are dropped when it is saved."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvProjector", "LinearProjector", "make_projector"]


class LinearProjector(nn.Module):
    """Linear map of the last dimension, in_dim -> out_dim: [N, D_S] -> [N, D_T], [N, L, D_S] -> [N, L, D_T].

    The FitNets regressor for vectors and tokens (and ND's embedding transform)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, student_features: Tensor) -> Tensor:
        if student_features.dim() < 2 or student_features.shape[-1] != self.linear.in_features:
            raise ValueError(f"student_features has shape {tuple(student_features.shape)}: this projector "
                             f"expects [N, {self.linear.in_features}] or [N, L, {self.linear.in_features}]")
        return self.linear(student_features)


class ConvProjector(nn.Module):
    """[N, C_S, H_S, W_S] -> [N, C_T, H_T, W_T]: adaptive average pooling to output_size (if given and
    different), then a 1x1 conv and, by default, BatchNorm.

    1x1 conv (no bias) + BatchNorm is the connector of OFD / RepDistiller's feature connectors; with
    batch_norm=False it is a plain 1x1 conv with bias. No ReLU (RepDistiller's ConvReg has one): it would
    clip the negative values of pre-activation teacher features. Pooling only shrinks: a student map
    smaller than output_size is refused (pool the teacher instead, or hint from an earlier student layer).
    """

    def __init__(self, in_channels: int, out_channels: int, *, output_size: Sequence[int] | None = None,
                 batch_norm: bool = True):
        super().__init__()
        self.output_size = None if output_size is None else tuple(int(size) for size in output_size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()

    def forward(self, student_features: Tensor) -> Tensor:
        if student_features.dim() != 4 or student_features.shape[1] != self.conv.in_channels:
            raise ValueError(f"student_features has shape {tuple(student_features.shape)}: this projector "
                             f"expects maps [N, {self.conv.in_channels}, H, W]")
        if self.output_size is not None and tuple(student_features.shape[2:]) != self.output_size:
            if any(size < target for size, target in zip(student_features.shape[2:], self.output_size)):
                raise ValueError(f"student_features has spatial size {tuple(student_features.shape[2:])}, smaller "
                                 f"than the projector's output_size {self.output_size}: pooling only shrinks")
            student_features = F.adaptive_avg_pool2d(student_features, self.output_size)
        return self.norm(self.conv(student_features))


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int], *,
                   batch_norm: bool = True) -> nn.Module | None:
    """The projector from per-example student_shape to teacher_shape (no batch dimension), or None if equal.

    (D_S,) -> (D_T,) and (L, D_S) -> (L, D_T): LinearProjector; (C_S, H_S, W_S) -> (C_T, H_T, W_T):
    ConvProjector, pooling to (H_T, W_T) when the sizes differ. ValueError when no projector can map
    them: different ranks, different sequence lengths, a student map smaller than the teacher's.
    """
    student_shape = tuple(int(size) for size in student_shape)
    teacher_shape = tuple(int(size) for size in teacher_shape)
    if any(size < 1 for size in student_shape + teacher_shape):
        raise ValueError(f"student_shape {student_shape} and teacher_shape {teacher_shape} must have positive sizes")
    if student_shape == teacher_shape:
        return None
    if len(student_shape) != len(teacher_shape):
        raise ValueError(f"student_shape {student_shape} and teacher_shape {teacher_shape} have different ranks: "
                         "no projector maps between them; pick layers of the same kind (vectors (D,), tokens "
                         "(L, D) or maps (C, H, W)) or use a relational loss (rkd_distance, rkd_angle, cka)")
    if len(student_shape) == 1:
        return LinearProjector(student_shape[0], teacher_shape[0])
    if len(student_shape) == 2:
        if student_shape[0] != teacher_shape[0]:
            raise ValueError(f"student_shape {student_shape} and teacher_shape {teacher_shape} have different "
                             "sequence lengths: a projector maps widths only; align the tokens first")
        return LinearProjector(student_shape[1], teacher_shape[1])
    if len(student_shape) == 3:
        if any(size < target for size, target in zip(student_shape[1:], teacher_shape[1:])):
            raise ValueError(f"student_shape {student_shape} has a smaller map than teacher_shape "
                             f"{teacher_shape}: the projector only pools down; pool the teacher's map or "
                             "pick an earlier (larger) student layer")
        output_size = None if student_shape[1:] == teacher_shape[1:] else teacher_shape[1:]
        return ConvProjector(student_shape[0], teacher_shape[0], output_size=output_size, batch_norm=batch_norm)
    raise ValueError(f"student_shape {student_shape}: expected a per-example shape (D,), (L, D) or (C, H, W)")
