"""Run tracking: per-edit figures and checkpoint metrics sent to TensorBoard or Weights & Biases.

Optional extras (``pip install deltaedit[tensorboard]`` / ``deltaedit[wandb]``). TensorBoard writes event files
under ``RUN/tensorboard``; W&B logs into ``RUN/wandb`` under a run id derived from the run directory, so a
``--resume`` continues the same W&B run (``WANDB_MODE=offline`` keeps it on disk; W&B's service completes
those files when it shuts down: at the process's exit, or ``wandb.teardown()`` in a longer-lived process).
Edits are logged at step = number of edits so far, checkpoints at their number of edits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb")


def flatten(groups: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as "group/name" keys (lists, text and None left out)."""
    out: dict[str, float] = {}
    for name, value in groups.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, key + "/"))
        elif isinstance(value, int | float):  # bools too
            out[key] = float(value)
    return out


class Tracker:
    """Base: does nothing (no --tracker)."""

    def log_edit(self, step: int, values: dict[str, Any]) -> None: ...

    def log_checkpoint(self, step: int, groups: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tracker tensorboard needs TensorBoard: pip install 'deltaedit[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in sorted(config.items())))

    def log_edit(self, step: int, values: dict[str, Any]) -> None:
        for name, value in flatten(values, "edit/").items():
            self.writer.add_scalar(name, value, step)

    def log_checkpoint(self, step: int, groups: dict[str, Any]) -> None:
        for name, value in flatten(groups, "checkpoint/").items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("--tracker wandb needs Weights & Biases: pip install 'deltaedit[wandb]'") from None
        self.wandb = wandb
        run_id = "deltaedit-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deltaedit"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log_edit(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(flatten(values, "edit/"), step=step)

    def log_checkpoint(self, step: int, groups: dict[str, Any]) -> None:
        self.run.log(flatten(groups, "checkpoint/"), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str | None, run_dir: Path, config: dict[str, Any]) -> Tracker:
    if kind is None:
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if kind == "wandb":
        return WandbTracker(run_dir, config)
    raise ValueError(f"tracker: use one of {TRACKERS}, not {kind!r}")
