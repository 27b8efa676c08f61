"""The live teacher: a causal LM in memory, run under no_grad on each micro-batch.

Every teacher source (this one, the top-k cache, later a served one) answers `signal(batch, hidden=...)`
with a `TeacherSignal` at the student's positions (position t predicts token t + 1), so the objective
never knows where the teacher came from."""
from __future__ import annotations

import torch

from distill.lm.data import model_inputs
from distill.lm.sharding import final_hidden_states, release
from distill.losses.fused import TeacherSignal


def fused_head(model):
    """(base model, linear head) when logits are exactly head(base(x).last_hidden_state); else None
    (e.g. logit soft-capping or scaling, which a fused path would skip)."""
    if model is None:
        return None
    head, base = model.get_output_embeddings(), getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or base is None:
        return None
    config = model.config
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("final_logit_softcapping", "logit_scale",
                                                                        "logits_scaling", "output_multiplier_scale")):
        return None
    return base, head


class LiveTeacher:
    """A teacher model in memory (eval mode, no gradients)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.fused = fused_head(model)

    @torch.no_grad()
    def signal(self, batch: dict, *, hidden: bool) -> TeacherSignal:
        """Final hidden states + head when `hidden` (the fused path) and the model allows it, else logits."""
        inputs = model_inputs(batch)
        if hidden and self.fused is not None:
            # (through the FSDP root's hooks when sharded: afterwards the head is the full parameter until
            # `release`; distill/lm/sharding.py)
            hidden_states = final_hidden_states(self.model, **inputs)
            _, head = self.fused
            return TeacherSignal(hidden=hidden_states[:, :-1], weight=head.weight, bias=head.bias)
        return TeacherSignal(logits=self.model(**inputs, use_cache=False).logits[:, :-1])

    def release(self) -> None:
        """After the loss that used this signal: a sharded teacher frees its gathered embeddings and head."""
        release(self.model)
