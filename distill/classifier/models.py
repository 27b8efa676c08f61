"""Small reference classifiers for the built-in image tasks, and how any classifier is saved.

Modules have stable, readable names (`conv1`, `conv2`, `fc1`, `head`, ...), so recipes can hook
their features by name. A saved classifier is a directory with `model.safetensors` (the state
dict) and `classifier.json` (architecture name, options, input shape, number of classes); learned
projectors are never part of it.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.core.assets import builtin_model
from distill.core.errors import DistillError
from distill.core.io import staged_directory

CONFIG_FILE = "classifier.json"


class MLP(nn.Sequential):
    """Flatten, then `hidden` Linear+ReLU layers (`fc1`, `act1`, ...), then `head`."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,)):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(input_shape)
        for index, size in enumerate(hidden, start=1):
            layers[f"fc{index}"] = nn.Linear(width, size)
            layers[f"act{index}"] = nn.ReLU()
            width = size
        layers["head"] = nn.Linear(width, num_classes)
        super().__init__(layers)


class SmallCNN(nn.Sequential):
    """`channels` blocks of 3x3 conv + BatchNorm + ReLU + 2x2 max-pool (`conv1`, `bn1`, `act1`, `pool1`, ...),
    then `flatten` (or, with `global_pool`, global average pooling first: fewer parameters, less spatial
    information), `fc` + ReLU (`fc_act`) of width `hidden`, and `head`."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (16, 32),
                 hidden: int = 64, global_pool: bool = False):
        if len(input_shape) != 3:
            raise DistillError(f"a CNN needs [channels, height, width] inputs, got shape {tuple(input_shape)}",
                               field="student.arch", fix="use arch: mlp for vector inputs")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = input_shape[0]
        for index, size in enumerate(channels, start=1):
            layers[f"conv{index}"] = nn.Conv2d(width, size, kernel_size=3, padding=1)
            layers[f"bn{index}"] = nn.BatchNorm2d(size)
            layers[f"act{index}"] = nn.ReLU()
            layers[f"pool{index}"] = nn.MaxPool2d(2) if min(input_shape[1:]) >= 2 ** index else nn.Identity()
            width = size
        if global_pool:
            layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        with torch.no_grad():  # the flattened width of the last map
            width = nn.Sequential(layers)(torch.zeros(1, *input_shape)).shape[1]
        layers["fc"] = nn.Linear(width, hidden)
        layers["fc_act"] = nn.ReLU()
        layers["head"] = nn.Linear(hidden, num_classes)
        super().__init__(layers)


ARCHITECTURES = {"mlp": MLP, "cnn": SmallCNN}


def build_classifier(arch: str, input_shape: tuple[int, ...], num_classes: int, options: dict | None = None,
                     *, seed: int | None = None, field: str = "student.arch") -> nn.Module:
    """A fresh classifier of a built-in architecture (`mlp`, `cnn`); `options` are its keyword arguments."""
    if arch not in ARCHITECTURES:
        raise DistillError(f"no built-in architecture `{arch}`", field=field, fix=f"use one of: {', '.join(ARCHITECTURES)}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = ARCHITECTURES[arch](tuple(input_shape), num_classes, **options)
    except TypeError as error:
        raise DistillError(f"bad options for arch `{arch}`: {error}", field=field.rsplit(".", 1)[0] + ".options",
                           fix="see distill/classifier/models.py for the options of each architecture") from None
    # What save_classifier needs to rebuild it (a plain attribute: not a parameter, not in the state dict).
    model.distill_describe = {"arch": arch, "input_shape": list(input_shape), "num_classes": num_classes,
                              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    return model


def save_classifier(model: nn.Module, directory: str | Path, *, arch: str, input_shape, num_classes: int,
                    options: dict | None = None, task: str | None = None) -> None:
    """Write `model.safetensors` + `classifier.json` into `directory` (staged, then renamed: atomic).
    `task` records the built-in data it was trained on (what `distill eval` scores it on by default)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    config = {"arch": arch, "options": options or {}, "input_shape": list(input_shape), "num_classes": num_classes}
    with staged_directory(directory) as staging:
        save_file(state, str(staging / "model.safetensors"))
        (staging / CONFIG_FILE).write_text(json.dumps({**config, **({"task": task} if task else {})}, indent=1))


def resolve_classifier_path(path: str, field: str) -> Path:
    """`builtin:mnist5k-teacher` -> the shipped checkpoint; otherwise a directory with classifier.json."""
    shipped = builtin_model(path, CONFIG_FILE, field)
    if shipped is not None:
        return shipped
    local = Path(path).expanduser()
    if not (local / CONFIG_FILE).is_file():
        raise DistillError(f"no saved classifier at `{path}` (expected {CONFIG_FILE} and model.safetensors)",
                           field=field, fix="point at a directory written by distill (student/ of a classifier run, "
                                            "or `distill train-teacher`)")
    return local


def load_classifier(path: str, field: str) -> tuple[nn.Module, dict]:
    """(model in eval mode, its classifier.json) from a saved directory or `builtin:` name."""
    directory = resolve_classifier_path(path, field)
    config = json.loads((directory / CONFIG_FILE).read_text())
    model = build_classifier(config["arch"], tuple(config["input_shape"]), config["num_classes"], config["options"],
                             field=field)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval(), config
