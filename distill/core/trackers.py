"""Experiment trackers (`log.trackers`): the run's logs sent to tensorboard, trackio or wandb through
accelerate's tracker classes (`accelerate.tracking`), on the main process only.

    check_trackers(recipe)      before anything is written or loaded: every tracker's package importable
    ExperimentTrackers.open()   RunDirectory.start(): start each tracker, the resolved recipe as its config
    .log(record, evaluation)    every losses.jsonl / metrics.jsonl record, as scalars
                                `<phase>/<key>` and `<phase>/eval/<metric>` at the record's step
    .close(failed)              RunDirectory.finish(), or core.run when the run fails

The classes are used without an `Accelerator` (the classifier and diffusion families have none, and the
LM family's belongs to its job): core constructs them, calls `start()` (which `Accelerator.init_trackers`
would do) and only ever does so on the main process.

A resumed run (--resume) keeps logging: tensorboard adds an event file to the same directory, wandb and
trackio start a new run in the same project. Steps the interrupted run logged after its last checkpoint
are logged again (losses.jsonl is rewound; event files are not), so TensorBoard shows those steps twice.
"""
from __future__ import annotations

import importlib.util
import json
import numbers
import os
from collections.abc import MutableMapping
from pathlib import Path

from distill.core.errors import DistillError

# tracker -> (modules that provide it, any one suffices; what to install)
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "trackio": (("trackio",), "pip install trackio"),
    "wandb": (("wandb",), "pip install wandb"),
}
TRACKERS_DIR = "trackers"  # default `log.dir`, inside the run directory


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def check_trackers(recipe) -> None:
    """Refuse a `log.trackers` entry whose package is not installed. Imports nothing, writes nothing."""
    for name in recipe.log.trackers:
        modules, install = TRACKER_PACKAGES[name]
        if not any(_importable(module) for module in modules):
            raise DistillError(f"tracker `{name}` needs the `{modules[0]}` package, which is not installed",
                               field="log.trackers", fix=f"`{install}`, or remove {name} from log.trackers")


def default_wandb_mode(environ: MutableMapping[str, str] | None = None) -> str:
    """The wandb mode a run uses: the user's WANDB_MODE if set; `online` with WANDB_API_KEY set; otherwise
    `offline`, written to WANDB_MODE, so that a run never waits on a login prompt or the network."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    environ["WANDB_MODE"] = "offline"
    return "offline"


def scalars(record: dict, *, evaluation: bool = False) -> dict[str, float]:
    """A losses.jsonl (or, with `evaluation`, metrics.jsonl) record as tracker scalars: `<phase>/<key>`
    (`<phase>/eval/<key>`), nested dicts joined with `/`; strings, booleans and None left out."""
    prefix = record.get("phase", "run") + ("/eval" if evaluation else "")
    values: dict[str, float] = {}

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                add(f"{key}/{inner}", inner_value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[key] = float(value)

    for key, value in record.items():
        if key not in ("phase", "step"):
            add(f"{prefix}/{key}", value)
    return values


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as `a.b.c` keys with str / int / float / bool values (lists as JSON), which is what
    TensorBoard's hparams accept; None values are left out."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = json.dumps(value)
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


class ExperimentTrackers:
    """The accelerate trackers of one run (main process only)."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self._wandb_phases: set[str] = set()

    @classmethod
    def open(cls, recipe, run_dir: Path) -> ExperimentTrackers:
        """Start every tracker of `recipe.log` and record the resolved recipe as its config."""
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

        # The trackers log through accelerate's logger, which raises unless accelerate's state exists: the LM
        # family's Accelerator made it; in the classifier and diffusion families this makes the one-process one.
        PartialState()
        spec = recipe.log
        directory = Path(spec.dir) if spec.dir else Path(run_dir) / TRACKERS_DIR
        project = spec.project or recipe.name
        config = recipe.model_dump(mode="json")
        trackers = []
        for name in spec.trackers:
            if name == "tensorboard":  # event files in <dir>/tensorboard
                tracker = TensorBoardTracker("tensorboard", directory)
            elif name == "wandb":
                default_wandb_mode()
                (directory / "wandb").mkdir(parents=True, exist_ok=True)
                tracker = WandBTracker(project, name=recipe.name, dir=str(directory / "wandb"))
            else:  # trackio: its config is given to init (accelerate's store_init_configuration updates
                # `trackio.config`, a module-level dict in trackio, not the run's config)
                tracker = TrackioTracker(project, name=recipe.name, config=config)
            # core calls the trackers on the main process only: accelerate need not check the rank again
            tracker.main_process_only = False
            tracker.start()
            if name == "tensorboard":
                tracker.store_init_configuration(flat_config(config))
            elif name == "wandb":
                tracker.store_init_configuration(config)
            trackers.append(tracker)
        return cls(trackers)

    def log(self, record: dict, *, evaluation: bool = False) -> None:
        """Send one log record's numeric values at its step."""
        values, step = scalars(record, evaluation=evaluation), record.get("step")
        if not values:
            return
        for tracker in self.trackers:
            if tracker.name == "wandb":
                self._log_wandb(tracker, record.get("phase", "run"), values, step)
            else:
                tracker.log(values, step=step)

    def _log_wandb(self, tracker, phase: str, values: dict, step) -> None:
        # wandb drops a step lower than one already logged, and each phase counts its steps from 0: each
        # phase's keys are plotted against their own `<phase>/step` instead of wandb's step.
        if phase not in self._wandb_phases:
            tracker.tracker.define_metric(f"{phase}/step")
            tracker.tracker.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._wandb_phases.add(phase)
        tracker.log({**values, f"{phase}/step": step} if step is not None else values)

    def close(self, *, failed: bool = False) -> None:
        """Finish every tracker (a failed wandb run is marked failed, not finished). Idempotent."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            if failed and tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1)
            else:
                tracker.finish()
