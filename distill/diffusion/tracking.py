"""What a diffusion trainer is given to report to its run: a `Tracker`. The trainer says when a step is
done; the tracker decides what that step writes (a loss record every `log_every` steps, an evaluation
every `eval_every`, a checkpoint every `checkpoint_every`, and each of them at the `last` step of a
stretch of training), so the trainers read top to bottom and never touch files themselves.

Without a run directory (a trainer called from Python, the teacher's training) the tracker only keeps
the loss records in memory and never evaluates or checkpoints.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from distill.core.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint, save_checkpoint, simulate_crash_after
from distill.core.rundir import RunDirectory

# evaluate(model, sampling_steps) -> metrics of the model's samples; sampling_steps None: the method's default.
Evaluate = Callable[[nn.Module, "int | None"], dict]


class Tracker:
    """Loss records, evaluations and checkpoints of one training phase (see the module docstring)."""

    def __init__(self, phase: str = "student", *, run_dir: RunDirectory | None = None, log_every: int = 50,
                 eval_every: int | None = None, evaluate: Evaluate | None = None,
                 checkpoint_every: int | None = None, resume: bool = False):
        self.phase, self.run_dir, self.resume = phase, run_dir, resume
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.evaluate_fn = evaluate
        self.records: list[dict] = []  # every loss record, also without a run directory

    @staticmethod
    def _due(step: int, every: int | None, last: int) -> bool:
        return every is not None and (step % every == 0 or step == last)

    def log(self, step: int, last: int, **values) -> None:
        """Record the step's losses and diagnostics (tensors or numbers) when due."""
        if not self._due(step, self.log_every, last):
            return
        record = {"phase": self.phase, "step": step, **{k: float(v) for k, v in values.items()}}
        self.records.append(record)
        if self.run_dir is not None:
            self.run_dir.log_losses(record)

    def evaluate(self, step: int, last: int, model: nn.Module, sampling_steps: int | None = None) -> None:
        """Score the model's samples when due (metrics.jsonl: {phase, step, metrics...})."""
        if self.run_dir is None or self.evaluate_fn is None or not self._due(step, self.eval_every, last):
            return
        training = model.training
        model.eval()
        with torch.no_grad():
            metrics = self.evaluate_fn(model, sampling_steps)
        model.train(training)
        self.run_dir.log_metrics({"phase": self.phase, "step": step, **metrics})

    def checkpoint(self, step: int, last: int, *, modules: dict[str, nn.Module], optimizers: dict,
                   generators: dict[str, torch.Generator], state: dict | None = None) -> None:
        """When due: write everything the trainer needs to continue from this step, then (testing aid)
        stop here if DISTILL_CRASH_AFTER_STEP names this step."""
        if self.run_dir is None or not self._due(step, self.checkpoint_every, last):
            return
        save_checkpoint(self.run_dir.checkpoint_dir(self.phase), modules=modules, optimizers=optimizers,
                        generators=generators, state={"phase": self.phase, "step": step, **(state or {})})
        simulate_crash_after(step)

    def saved_state(self) -> dict | None:
        """The state (step, and what the trainer added) of the checkpoint a resumed run continues from; None
        when there is none (not resuming, or interrupted before the first checkpoint: then the phase's log
        lines are dropped, as they are written again)."""
        if self.run_dir is None or not self.resume:
            return None
        found = find_checkpoint(self.run_dir.checkpoint_dir(self.phase))
        if found is None:
            self.run_dir.rewind(self.phase, 0)
            return None
        return json.loads((found / STATE_FILE).read_text())

    def restore(self, *, modules: dict[str, nn.Module], optimizers: dict,
                generators: dict[str, torch.Generator]) -> int:
        """On resume: load the last checkpoint into these objects (the global RNG too) and drop the log lines
        written after it; the step training continues after (0: from the start)."""
        if self.saved_state() is None:
            return 0
        state = load_checkpoint(self.run_dir.checkpoint_dir(self.phase), modules=modules, optimizers=optimizers,
                                generators=generators)
        self.run_dir.rewind(self.phase, state["step"])
        return state["step"]
