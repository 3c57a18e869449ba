"""The training checkpoint: its format, writing it, resuming from it, and the run's result in it.

A checkpoint is a folder:

- ``model.safetensors``: the weights after the checkpoint's epoch;
- ``best.safetensors``: the best epoch's weights, only when that epoch is not this one;
- ``state.pt``: optimizer and scheduler state, the epoch (0-based) and the optimizer steps done;
- ``history.json``: ``{"history": [metrics per epoch], "best": metrics of the best epoch}``.

Carrying the best weights in the latest checkpoint makes the run's result independent of which
checkpoints Ray keeps (an in-process run keeps only the last one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"  # only when the best epoch is not the checkpoint's own
STATE = "state.pt"
HISTORY = "history.json"
LOCAL_CHECKPOINT_PREFIX = "fpc-ckpt-"  # the folders each epoch writes before Ray takes them


class CheckpointHistory(BaseModel):
    """``history.json``: what resuming relies on, typed (a damaged one is one line, not a KeyError)."""

    history: list[dict]
    best: dict


def selection_score(metrics: dict) -> tuple[float, float]:
    """How epochs are ranked: val top-1, then lower val loss breaks ties."""
    return metrics["val_top1"], -metrics["val_loss"]


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU, contiguous (as safetensors wants them)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


@dataclass
class Progress:
    """Where a run stands: epochs done, optimizer steps done, each epoch's metrics and the best.

    ``best_state`` (the best epoch's weights) is what rank 0 writes into checkpoints; other ranks
    keep none while training (a resumed run loads it on every rank, as the checkpoint has it).
    """

    epochs_done: int = 0
    updates: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    best_state: dict | None = None

    def elapsed_s(self) -> float:
        """Training time of the epochs done, resumed runs included."""
        return self.history[-1]["elapsed_s"] if self.history else 0.0

    def record(self, metrics: dict, model: torch.nn.Module, keep_weights: bool) -> None:
        """Add a finished epoch's metrics; keep its weights when it is the best so far."""
        self.history.append(metrics)
        self.epochs_done = metrics["epoch"]
        if not self.best or selection_score(metrics) > selection_score(self.best):
            self.best = dict(metrics)
            self.best_state = cpu_state(model) if keep_weights else None


def save_checkpoint(model: torch.nn.Module, optimizer, scheduler, progress: Progress) -> str:
    """Write a checkpoint of the epoch ``progress`` ends at into a new temp folder; its path."""
    path = tempfile.mkdtemp(prefix=LOCAL_CHECKPOINT_PREFIX)
    save_file(cpu_state(model), os.path.join(path, WEIGHTS))
    if progress.best_state is not None and progress.best["epoch"] != progress.epochs_done:
        save_file(progress.best_state, os.path.join(path, BEST_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": progress.epochs_done - 1, "updates": progress.updates}, os.path.join(path, STATE))
    with open(os.path.join(path, HISTORY), "w") as f:
        json.dump({"history": progress.history, "best": progress.best}, f)
    return path


def best_weights(path: str) -> dict[str, torch.Tensor]:
    """The best epoch's weights in a checkpoint folder, else (the best epoch is its own) the last.

    Both resuming and the driver's final model read the run's result here.
    """
    best = os.path.join(path, BEST_WEIGHTS)
    return load_file(best if os.path.exists(best) else os.path.join(path, WEIGHTS))


def read_history(path: str) -> tuple[list[dict], dict]:
    """The per-epoch metrics and the best epoch's metrics recorded in a checkpoint folder."""
    from fpc_ray.files import read_json
    from fpc_ray.storage import resolve

    saved = read_json(resolve(os.path.join(path, HISTORY)), "checkpoint history", CheckpointHistory)
    return saved.history, saved.best


def resume(path: str, model: torch.nn.Module, optimizer, scheduler, device: torch.device) -> Progress:
    """Load a checkpoint folder into the model, optimizer and scheduler; where the run stands.

    The scheduler is told the optimizer steps done, so the learning rate continues the schedule.
    """
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=str(device)))
    state = torch.load(os.path.join(path, STATE), map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    updates = state.get("updates")
    if updates is None:  # written before timm's scheduler: torch's LambdaLR counted the steps itself
        updates = int(state["scheduler"]["last_epoch"])
    else:
        scheduler.load_state_dict(state["scheduler"])
    scheduler.step_update(updates)
    history, best = read_history(path)
    return Progress(epochs_done=state["epoch"] + 1, updates=updates, history=history, best=best,
                    best_state=best_weights(path))


def discard_local_checkpoint(path: str | None) -> None:
    """Remove a checkpoint folder :func:`save_checkpoint` wrote to the temp dir, once nothing needs it.

    Ray deletes it after uploading to the run's storage, except in an in-process run
    (``ScalingConfig(num_workers=0)``), where the folder itself is the checkpoint: there each
    epoch's would stay behind in /tmp (about 70 MB each). Any other folder is left alone.
    """
    if path and os.path.basename(path).startswith(LOCAL_CHECKPOINT_PREFIX) \
            and os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)
