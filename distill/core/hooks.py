"""Features by name, without editing the model: forward hooks on named modules, or the hidden
states / attentions a transformers model returns.

Names:
- `conv2` — the output of the module `conv2` (as in `model.named_modules()`);
- `conv2:input` — its (first) input;
- `hidden_states.N`, `attentions.N` — entry N of a transformers model's `hidden_states` /
  `attentions` output (the forward is asked for them), e.g. `hidden_states.-1` for the last layer.
A name that matches nothing is refused before training, with the closest valid names.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from distill.core.errors import DistillError

OUTPUT_FIELDS = ("hidden_states", "attentions")


def _output_field(name: str) -> tuple[str, int] | None:
    field, _, index = name.partition(".")
    if field in OUTPUT_FIELDS and index.lstrip("-").isdigit():
        return field, int(index)
    return None


def check_feature_name(model: nn.Module, name: str, *, field: str, role: str) -> None:
    """Refuse a name that matches no module (with the closest names) before any training."""
    if _output_field(name) is not None:
        if not hasattr(getattr(model, "config", None), "output_hidden_states"):
            raise DistillError(f"`{name}` reads a transformers output, and the {role} is not a transformers model",
                               field=field, fix="name a module instead (see the list with `distill layers`)")
        return
    module_name, _, side = name.partition(":")
    if side not in ("", "input", "output"):
        raise DistillError(f"`{name}`: the part after ':' must be `input` or `output`", field=field,
                           fix=f"write {module_name}:input or {module_name}")
    names = [n for n, _ in model.named_modules() if n]
    if module_name not in names:
        close = difflib.get_close_matches(module_name, names, n=5, cutoff=0.3)
        listing = ", ".join(close or names[:12])
        raise DistillError(f"the {role} has no module `{module_name}`", field=field,
                           fix=f"closest valid names: {listing}")


class FeatureTaps:
    """Collects named features during one forward. Use as a context manager around the forward:

        with FeatureTaps(model, ["conv2", "fc1:input"]) as taps:
            logits = forward(model, x, **taps.forward_options)
        taps.features  # {"conv2": tensor, "fc1:input": tensor}
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(dict.fromkeys(names))
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []

    @property
    def forward_options(self) -> dict:
        fields = {parsed[0] for name in self.names if (parsed := _output_field(name))}
        return {f"output_{field}": True for field in fields}

    def __enter__(self) -> "FeatureTaps":
        self.features = {}
        modules = dict(self.model.named_modules())
        for name in self.names:
            if _output_field(name) is not None:
                continue
            module_name, _, side = name.partition(":")

            def hook(module, inputs, output, name=name, side=side):
                value = inputs[0] if side == "input" else output
                self.features[name] = value[0] if isinstance(value, tuple) else value
            self._handles.append(modules[module_name].register_forward_hook(hook))
        return self

    def collect(self, output) -> None:
        """Take `hidden_states.N` / `attentions.N` from a transformers output."""
        for name in self.names:
            parsed = _output_field(name)
            if parsed is None:
                continue
            values = getattr(output, parsed[0], None)
            if values is None:
                raise DistillError(f"the model returned no `{parsed[0]}` for feature `{name}`", field="objective.terms",
                                   fix="use a transformers model that supports output_hidden_states / "
                                       "output_attentions (attention implementation `eager` for attentions)")
            self.features[name] = values[parsed[1]]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def logits_of(output) -> torch.Tensor:
    """A classifier's logits: the tensor itself, or the `.logits` of a transformers output."""
    return output if isinstance(output, torch.Tensor) else output.logits


def forward(model: nn.Module, inputs, taps: FeatureTaps | None = None) -> torch.Tensor:
    """Run `model` on a tensor or a dict of tensors (transformers), collecting `taps`; return logits."""
    options = taps.forward_options if taps is not None else {}
    output = model(**inputs, **options) if isinstance(inputs, dict) else model(inputs)
    if taps is not None:
        taps.collect(output)
    return logits_of(output)


def module_names(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class name) of every named submodule: what a recipe can hook."""
    return [(name, type(module).__name__) for name, module in model.named_modules() if name]
