"""Feature-level (hint) distillation objectives, and the projectors that make student widths match the teacher's.

Every loss is a pure function with one signature, so the trainer can pick one by name:

    fn(student_features, teacher_features, **params) -> scalar Tensor

- features are [N, D] vectors, [N, C, H, W] maps or [N, L, D] token sequences, as each loss allows;
  N (the batch) must be the same on both sides;
- FitNets and cosine compare features point-wise: the shapes must be equal (their specs say equal_shapes), and a
  projector (distill/losses/projectors.py: make_projector) maps the student first; attention
  transfer needs equal spatial sizes only; RKD and CKA compare relations between the examples of a
  batch, so the widths may differ;
- the value is a mean over the batch (and over positions / pairs / triplets where the loss has them);
- computation is in float32 at least: bf16/fp16 inputs are upcast, float64 stays float64.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.common import compute_dtype
from distill.losses.registry import Param, register

__all__ = [
    "attention_transfer", "cka_loss", "class_means", "cosine_feature", "fitnets", "linear_cka", "nd_loss",
    "rkd_angle", "rkd_distance",
]

# Floor for norms we divide by (as F.normalize): a zero vector normalises to zero instead of NaN.
_NORM_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Shared plumbing: validation and compute dtype
# ---------------------------------------------------------------------------------------------


def _check_batch(student_features: Tensor, teacher_features: Tensor, *, min_examples: int = 1) -> None:
    """Both are Tensors of rank 2-4 ([N, D], [N, L, D], [N, C, H, W]) with the same N >= min_examples."""
    for name, features in (("student_features", student_features), ("teacher_features", teacher_features)):
        if not isinstance(features, Tensor):
            raise ValueError(f"{name} must be a Tensor, got {type(features).__name__}")
        if not 2 <= features.dim() <= 4:
            raise ValueError(f"{name} has shape {tuple(features.shape)}: expected [N, D], [N, L, D] or "
                             "[N, C, H, W] (add the batch dimension to a single example)")
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"student_features has {student_features.shape[0]} examples but teacher_features "
                         f"{teacher_features.shape[0]}: pass the features of the same batch")
    if student_features.shape[0] < min_examples:
        raise ValueError(f"student_features has {student_features.shape[0]} examples: this loss compares "
                         f"examples with each other and needs a batch of at least {min_examples}")


def _check_same_shape(student_features: Tensor, teacher_features: Tensor) -> None:
    _check_batch(student_features, teacher_features)
    if student_features.shape != teacher_features.shape:
        kind = "conv" if student_features.dim() == 4 else "linear"
        raise ValueError(f"student_features has shape {tuple(student_features.shape)} but teacher_features "
                         f"{tuple(teacher_features.shape)}: add a projector (projector: {kind}, see "
                         "make_projector) or pick layers of equal width")


def _rows(student_features: Tensor, teacher_features: Tensor, min_examples: int) -> tuple[Tensor, Tensor]:
    """Validate for a relational loss; both flattened to [N, width] in the compute dtype."""
    _check_batch(student_features, teacher_features, min_examples=min_examples)
    dtype = compute_dtype(student_features, teacher_features)
    num_examples = student_features.shape[0]
    return (student_features.reshape(num_examples, -1).to(dtype),
            teacher_features.reshape(num_examples, -1).to(dtype))


def _check_matrix(name: str, value: object, expected: str) -> None:
    """`value` is a 2-D Tensor; ValueError naming `name` and the expected layout otherwise."""
    if not isinstance(value, Tensor) or value.dim() != 2:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be {expected}, got {got}")


def _normalized(vectors: Tensor, dim: int = -1) -> Tensor:
    return vectors / torch.linalg.vector_norm(vectors, dim=dim, keepdim=True).clamp(min=_NORM_EPS)


# ---------------------------------------------------------------------------------------------
# Point-wise losses: FitNets, cosine
# ---------------------------------------------------------------------------------------------

@register("fitnets", kind="feature", equal_shapes=True, formula="mean over elements of (s - t)^2",
          paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets")
def fitnets(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss: mean over all elements of (s - t)^2 (mean squared error).

    Source: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets". The paper writes
    1/2 ||u_h - r(v_g)||^2 per example; we take the element mean, as the reference code (RepDistiller's
    HintLoss, torchdistill) does, so the scale does not grow with the width. Shapes must be equal: the
    regressor r (a projector) is applied by the caller. No parameters.
    """
    _check_same_shape(student_features, teacher_features)
    dtype = compute_dtype(student_features, teacher_features)
    return (student_features.to(dtype) - teacher_features.to(dtype)).pow(2).mean()


@register("cosine", kind="feature", equal_shapes=True,
          formula="mean over examples (and positions) of 1 - cos(s, t) along the feature dim",
          paper="cosine distance of features; the direction-only baseline of Wang et al. 2023 (ND)")
def cosine_feature(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Cosine feature loss: mean over examples and positions of 1 - cos(s, t), in [0, 2].

    The cosine is taken along the feature dimension: D for [N, D] and [N, L, D] (one per token), the
    channels C for [N, C, H, W] (one per spatial position). A zero vector has cosine 0 with anything.
    Shapes must be equal (add a projector first). It is the direction-only baseline of ND (Wang et al.
    2023, see nd_loss), here against each example's own teacher feature. No parameters.
    """
    _check_same_shape(student_features, teacher_features)
    dtype = compute_dtype(student_features, teacher_features)
    feature_dim = 1 if student_features.dim() == 4 else -1
    cosine = (_normalized(student_features.to(dtype), feature_dim)
              * _normalized(teacher_features.to(dtype), feature_dim)).sum(dim=feature_dim)
    return (1.0 - cosine).mean()


# ---------------------------------------------------------------------------------------------
# Attention transfer
# ---------------------------------------------------------------------------------------------

@register("attention", kind="feature",
          formula="mean_n || Q_S/||Q_S|| - Q_T/||Q_T|| ||_2, Q = vec(sum_c |A_c|^p)",
          paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention",
          params={"p": Param(2.0, "float", low=0, low_open=True, doc="exponent of the attention map sum_c |A_c|^p")})
def attention_transfer(student_features: Tensor, teacher_features: Tensor, *, p: float = 2.0) -> Tensor:
    """Activation-based attention transfer: mean over the batch of || Q_S/||Q_S|| - Q_T/||Q_T|| ||_2.

    Q = vec(sum_c |A_c|^p) is the spatial attention map: the channel sum of |activation|^p at each
    position, flattened, then L2-normalised per example. For [N, C, H, W] maps the positions are H x W;
    for [N, L, D] token features the L tokens are the positions and D the channels. Channel counts may
    differ (only the spatial sizes must match), and the loss does not change if the channels of one side
    are duplicated (the normalisation removes the scale).

    Source: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR), eq. 2: the p-norm
    (p = 2 in their experiments) of the difference, NOT squared, with weight beta/2 left to the caller.
    Their code (and RepDistiller / torchdistill after it) instead uses (Q_S - Q_T)^2 averaged over the
    batch and the positions, i.e. ||.||^2 / (H W); we follow the paper.
    Parameter: p > 0, the exponent of the attention map, default 2 (the paper's choice).
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < math.inf:
        raise ValueError(f"p must be a number > 0 (finite), got {p!r}")
    _check_batch(student_features, teacher_features)
    if student_features.dim() != teacher_features.dim() or student_features.dim() == 2:
        raise ValueError(f"student_features has shape {tuple(student_features.shape)} and teacher_features "
                         f"{tuple(teacher_features.shape)}: attention transfer needs spatial positions of the "
                         "same kind on both sides, maps [N, C, H, W] or tokens [N, L, D] (for vectors use "
                         "cosine or fitnets)")
    is_map = student_features.dim() == 4
    student_positions = student_features.shape[2:] if is_map else student_features.shape[1:2]
    teacher_positions = teacher_features.shape[2:] if is_map else teacher_features.shape[1:2]
    if student_positions != teacher_positions:
        raise ValueError(f"student_features has spatial size {tuple(student_positions)} but teacher_features "
                         f"{tuple(teacher_positions)}: pool the larger map (F.adaptive_avg_pool2d) or pick "
                         "layers of equal resolution / sequence length")
    dtype = compute_dtype(student_features, teacher_features)
    channel_dim = 1 if is_map else -1

    def attention(features: Tensor) -> Tensor:
        activations = features.to(dtype).abs()
        powered = activations.square() if p == 2 else activations.pow(p)
        return _normalized(powered.sum(dim=channel_dim).reshape(features.shape[0], -1))

    difference = attention(student_features) - attention(teacher_features)
    # vector_norm's gradient at a zero difference is 0 (not NaN): identical maps are a safe minimum.
    return torch.linalg.vector_norm(difference, dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Relational losses: RKD distance and angle, linear CKA
# ---------------------------------------------------------------------------------------------

def _centered_gram(rows: Tensor) -> Tensor:
    # Relations are translation invariant; centring first keeps the Gram trick's cancellation small.
    centered = rows - rows.mean(dim=0, keepdim=True)
    return centered @ centered.T


def _pair_distances(gram: Tensor) -> Tensor:
    """||x_i - x_j|| for the N(N-1)/2 pairs i < j, from the Gram matrix."""
    squared_norms = gram.diagonal()
    i, j = torch.triu_indices(gram.shape[0], gram.shape[0], offset=1, device=gram.device)
    squared = squared_norms[i] + squared_norms[j] - 2.0 * gram[i, j]
    # The floor keeps sqrt's gradient finite for coincident points (their pair then gets no gradient).
    return squared.clamp(min=torch.finfo(gram.dtype).tiny).sqrt()


@register("rkd_distance", kind="feature", min_examples=2,
          formula="mean_{i!=j} huber(d_S(i,j)/mu_S - d_T(i,j)/mu_T), d = ||x_i - x_j||, mu = mean d",
          paper="Park et al. 2019, Relational Knowledge Distillation")
def rkd_distance(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD distance-wise loss: mean over pairs i != j of huber(psi_S(i, j) - psi_T(i, j)).

    psi(i, j) = ||x_i - x_j||_2 / mu, mu = the mean of ||x_i - x_j||_2 over the distinct pairs of the batch;
    huber is smooth L1 with delta = 1 (0.5 x^2 if |x| <= 1, else |x| - 0.5). Inputs [N, ...] are flattened
    to [N, width]; the widths may differ. Invariant to rotations, translations and isotropic scaling of
    either side. Needs N >= 2.

    Source: Park et al. 2019, "Relational Knowledge Distillation" (CVPR), eq. 3-4. The paper sums over
    the distinct pairs; we average over them. The reference code (lenscloth/RKD, RepDistiller) averages
    smooth L1 over all N^2 entries of the distance matrix, zero diagonal included: theirs = ours (N-1)/N.
    """
    student_rows, teacher_rows = _rows(student_features, teacher_features, min_examples=2)

    def potential(rows: Tensor) -> Tensor:
        distances = _pair_distances(_centered_gram(rows))
        return distances / distances.mean().clamp(min=torch.finfo(distances.dtype).tiny)

    return F.smooth_l1_loss(potential(student_rows), potential(teacher_rows), beta=1.0)


def _triplet_cosines(gram: Tensor) -> Tensor:
    """cos of the angle at x_j between x_i and x_k, <e_ij, e_kj> with e_ij = (x_i - x_j)/||x_i - x_j||,
    for every triplet of distinct indices (N(N-1)(N-2) values), from the Gram matrix."""
    n = gram.shape[0]
    squared_norms = gram.diagonal()
    # dots[j, i, k] = <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj
    dots = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + squared_norms.view(n, 1, 1)
    # lengths[j, i] = ||x_i - x_j||; the diagonal (i = j) is never used, set to 1 so nothing divides by 0
    squared_lengths = squared_norms.view(n, 1) + squared_norms.view(1, n) - 2.0 * gram
    eye = torch.eye(n, dtype=torch.bool, device=gram.device)
    lengths = torch.where(eye, 1.0, squared_lengths).clamp(min=torch.finfo(gram.dtype).tiny).sqrt()
    cosines = dots / (lengths.unsqueeze(2) * lengths.unsqueeze(1))
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # j != i, j != k, i != k
    return cosines[distinct]


@register("rkd_angle", kind="feature", min_examples=3,
          formula="mean_{i,j,k distinct} huber(<e_ij, e_kj>_S - <e_ij, e_kj>_T), e_ij = (x_i - x_j)/||x_i - x_j||",
          paper="Park et al. 2019, Relational Knowledge Distillation")
def rkd_angle(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD angle-wise loss: mean over triplets of distinct (i, j, k) of huber(psi_S(i,j,k) - psi_T(i,j,k)).

    psi(i, j, k) = cos of the angle at x_j = <e_ij, e_kj>, e_ij = (x_i - x_j) / ||x_i - x_j||_2; huber is
    smooth L1 with delta = 1. Inputs [N, ...] are flattened to [N, width]; the widths may differ.
    Invariant to rotations, translations and scaling of either side. Needs N >= 3. Memory is O(N^3)
    (no N x N x D difference tensor: the dot products come from the Gram matrix).

    Source: Park et al. 2019, "Relational Knowledge Distillation" (CVPR), eq. 5-6. The paper sums over
    triplets of distinct examples; we average over them. The reference code averages over all N^3
    entries, degenerate ones included (they match exactly on both sides, so add 0): theirs = ours
    (N-1)(N-2)/N^2.
    """
    student_rows, teacher_rows = _rows(student_features, teacher_features, min_examples=3)
    return F.smooth_l1_loss(_triplet_cosines(_centered_gram(student_rows)),
                            _triplet_cosines(_centered_gram(teacher_rows)), beta=1.0)


def linear_cka(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Linear CKA similarity: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), X, Y column-centred, in [0, 1].

    X = student [N, width_S], Y = teacher [N, width_T] (inputs [N, ...] flattened); the widths may differ.
    Equal to <K, L>_F / (||K||_F ||L||_F) with the centred Gram matrices K = X X^T, L = Y Y^T (the
    HSIC form); we use whichever of the two forms has the smaller matrices. 1 for X against itself;
    invariant to orthogonal transforms and isotropic scaling of either side. A constant side (no
    variance) gives 0. Needs N >= 2.

    Source: Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited" (ICML), eq. 5.
    """
    student_rows, teacher_rows = _rows(student_features, teacher_features, min_examples=2)
    student_rows = student_rows - student_rows.mean(dim=0, keepdim=True)
    teacher_rows = teacher_rows - teacher_rows.mean(dim=0, keepdim=True)
    if student_rows.shape[0] <= max(student_rows.shape[1], teacher_rows.shape[1]):
        student_gram, teacher_gram = student_rows @ student_rows.T, teacher_rows @ teacher_rows.T
        cross = (student_gram * teacher_gram).sum()
    else:
        student_gram, teacher_gram = student_rows.T @ student_rows, teacher_rows.T @ teacher_rows
        cross = (teacher_rows.T @ student_rows).square().sum()
    scale = torch.linalg.matrix_norm(student_gram) * torch.linalg.matrix_norm(teacher_gram)
    return cross / scale.clamp(min=torch.finfo(scale.dtype).tiny)


@register("cka", kind="feature", min_examples=2,
          formula="1 - ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), X, Y column-centred",
          paper="Kornblith et al. 2019, Similarity of Neural Network Representations Revisited")
def cka_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """CKA loss: 1 - linear_cka(student, teacher), in [0, 1]; 0 when the representations agree up to
    rotation and isotropic scale. Source: Kornblith et al. 2019 (the similarity). No parameters."""
    return 1.0 - linear_cka(student_features, teacher_features)


# ---------------------------------------------------------------------------------------------
# ND: norm and direction, against the teacher's class means
# ---------------------------------------------------------------------------------------------

def _check_labels(labels: Tensor, num_examples: int, num_classes: int, what: str) -> None:
    if not isinstance(labels, Tensor) or labels.shape != (num_examples,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer Tensor of shape ({num_examples},), one class per example "
                         f"of {what}, got {shape}")
    if num_examples and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean of features: [K, D] with row k = mean of features[i] over the i with labels[i] == k.

    Run over the teacher's features of the training set (in eval mode, as the ND code does) to get the
    `teacher_class_means` of nd_loss. Sums are accumulated in float64; the result is in the compute dtype
    (float32 at least). A class without examples gets a zero row (nd_loss refuses to use it).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    _check_matrix("features", features, "[N, D] embeddings")
    _check_labels(labels, features.shape[0], int(num_classes), "features")
    sums = torch.zeros(int(num_classes), features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.to(torch.float64))
    counts = torch.bincount(labels, minlength=int(num_classes)).clamp(min=1).to(torch.float64)
    return (sums / counts.unsqueeze(1)).to(compute_dtype(features))


@register("nd", kind="feature", needs_labels=True, needs_class_means=True, equal_shapes=True,
          formula="mean_i 1 - <s_i, c_y/||c_y||> / max(||s_i||, ||t_i||), c_y = teacher class mean of label y",
          paper="Wang et al. 2023, Improving Knowledge Distillation via Regularizing Feature Norm and Direction")
def nd_loss(student_features: Tensor, teacher_class_means: Tensor, labels: Tensor,
            teacher_norm: float | Tensor | None = None) -> Tensor:
    """ND loss: mean over the batch of 1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, n_i).

    s_i is the student embedding [N, D], c_k the teacher's class mean of class k [K, D] (class_means) and
    y_i = labels[i]. The projection of s_i on the class-mean direction is divided by the larger of the
    student's norm and the target norm n_i: while ||s_i|| < n_i the loss falls as the student norm grows
    (the norm term); once ||s_i|| >= n_i it is 1 - cos(s_i, c_{y_i}) (the direction term).
    teacher_norm is n_i: a Tensor [N] of the teacher's per-example embedding norms ||t_i|| (what the
    official code uses), or one number / 0-dim Tensor (e.g. the teacher's mean norm over the data set),
    or None for no norm term (n_i = 0: plain 1 - cos, the paper's cosine baseline).
    Widths must match: as the official code, map the student with a projector (LinearProjector) first.

    Source: Wang et al. 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and
    Direction" (arXiv 2305.17007), ND loss; official code WangYZ1608/Knowledge-Distillation-via-ND
    (DirectNormLoss: 1 - dot(s, e_c) / max(||s||, ||t||), averaged over the batch).
    """
    _check_matrix("student_features", student_features, "[N, D] embeddings")
    _check_matrix("teacher_class_means", teacher_class_means, "[num_classes, D] (see class_means)")
    if student_features.shape[1] != teacher_class_means.shape[1]:
        raise ValueError(f"student_features has width {student_features.shape[1]} but teacher_class_means "
                         f"{teacher_class_means.shape[1]}: add a projector (projector: linear) to the student "
                         "embedding, as the ND code does")
    num_examples = student_features.shape[0]
    if num_examples == 0:
        raise ValueError("student_features has 0 examples: nd_loss needs a batch of at least 1")
    _check_labels(labels, num_examples, teacher_class_means.shape[0], "student_features")
    dtype = compute_dtype(student_features, teacher_class_means)
    centers = teacher_class_means.to(dtype)[labels]
    center_norms = torch.linalg.vector_norm(centers, dim=-1)
    if bool((center_norms == 0).any()):
        missing = sorted(set(labels[center_norms == 0].tolist()))
        raise ValueError(f"teacher_class_means has a zero row for classes {missing}: it has no direction "
                         "(no teacher examples of these classes when the means were computed?)")
    student = student_features.to(dtype)
    student_norms = torch.linalg.vector_norm(student, dim=-1)
    if teacher_norm is None:
        scale = student_norms
    else:
        if isinstance(teacher_norm, Tensor):
            if teacher_norm.shape not in ((), (num_examples,)):
                raise ValueError(f"teacher_norm must be a number or a Tensor of shape () or ({num_examples},), "
                                 f"got shape {tuple(teacher_norm.shape)}")
            target = teacher_norm.to(dtype)
        elif isinstance(teacher_norm, numbers.Real) and not isinstance(teacher_norm, bool):
            target = torch.tensor(float(teacher_norm), dtype=dtype, device=student.device)
        else:
            raise ValueError(f"teacher_norm must be None, a number or a Tensor, got {type(teacher_norm).__name__}")
        if bool((target < 0).any()) or bool(target.isnan().any()):
            raise ValueError("teacher_norm must be >= 0 (a norm)")
        scale = torch.maximum(student_norms, target.expand_as(student_norms))
    projection = (student * centers).sum(dim=-1) / center_norms
    return (1.0 - projection / scale.clamp(min=_NORM_EPS)).mean()
