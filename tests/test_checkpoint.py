"""The training checkpoint's format, round trip, best-else-last rule and clean-up (no Ray cluster)."""

from __future__ import annotations

import os
import tempfile

import pytest
import ray.train
import torch

from fpc_ray.config import TrainConfig
from fpc_ray.train.checkpoint import (
    BEST_WEIGHTS,
    HISTORY,
    LOCAL_CHECKPOINT_PREFIX,
    STATE,
    WEIGHTS,
    Progress,
    best_weights,
    discard_local_checkpoint,
    read_history,
    resume,
    save_checkpoint,
)
from fpc_ray.train.recipe import build_optimizer, build_scheduler, current_lr

CFG = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=1, frozen_epochs=0)
STEPS = 4


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    optimizer = build_optimizer(model, CFG)
    return model, optimizer, build_scheduler(optimizer, CFG, STEPS)


def _epoch(model, optimizer, scheduler, progress: Progress, val_top1: float) -> None:
    for _ in range(STEPS):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.updates += 1
        scheduler.step_update(progress.updates)
    metrics = {"epoch": progress.epochs_done + 1, "val_top1": val_top1, "val_loss": 1 - val_top1,
               "lr": current_lr(optimizer), "elapsed_s": progress.elapsed_s() + 1.0}
    progress.record(metrics, model, keep_weights=True)


@pytest.fixture
def written():
    """Two epochs, the first the best; a checkpoint of the second. Yields (path, model, optimizer,
    scheduler, progress, the best epoch's weights)."""
    model, optimizer, scheduler = _parts(0)
    progress = Progress()
    _epoch(model, optimizer, scheduler, progress, val_top1=0.9)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _epoch(model, optimizer, scheduler, progress, val_top1=0.5)
    path = save_checkpoint(model, optimizer, scheduler, progress)
    yield path, model, optimizer, scheduler, progress, first
    discard_local_checkpoint(path)


def test_round_trip_resumes_weights_optimizer_schedule_and_history(written):
    path, model, optimizer, scheduler, progress, first = written
    assert {WEIGHTS, BEST_WEIGHTS, STATE, HISTORY} == set(os.listdir(path))
    other, other_optimizer, other_scheduler = _parts(1)
    with ray.train.Checkpoint.from_directory(path).as_directory() as folder:  # as the loop reads it
        resumed = resume(folder, other, other_optimizer, other_scheduler, torch.device("cpu"))
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    state, resumed_state = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert state.keys() == resumed_state.keys()
    for k in state:
        assert torch.equal(state[k]["exp_avg"], resumed_state[k]["exp_avg"])
    assert current_lr(other_optimizer) == current_lr(optimizer)
    assert (resumed.epochs_done, resumed.updates) == (2, 2 * STEPS)
    assert resumed.history == progress.history and resumed.best == progress.best
    assert resumed.best["epoch"] == 1
    for k, v in first.items():
        assert torch.equal(resumed.best_state[k], v), k
    # The schedule goes on from the steps done: the next step's rate is the one it would have been.
    scheduler.step_update(2 * STEPS + 1)
    other_scheduler.step_update(resumed.updates + 1)
    assert current_lr(other_optimizer) == current_lr(optimizer)


def test_best_weights_are_the_best_epochs_else_the_last(written):
    path, model, _, _, progress, first = written
    best = best_weights(path)
    assert all(torch.equal(best[k], v) for k, v in first.items())
    history, best_metrics = read_history(path)
    assert [h["epoch"] for h in history] == [1, 2] and best_metrics["epoch"] == 1

    # A checkpoint of the best epoch itself carries no second copy: its own weights are the best.
    model, optimizer, scheduler = _parts(2)
    progress = Progress()
    _epoch(model, optimizer, scheduler, progress, val_top1=0.7)
    own = save_checkpoint(model, optimizer, scheduler, progress)
    try:
        assert BEST_WEIGHTS not in os.listdir(own)
        assert all(torch.equal(best_weights(own)[k], v) for k, v in model.state_dict().items())
    finally:
        discard_local_checkpoint(own)


def test_ties_on_top1_go_to_the_lower_val_loss():
    model = torch.nn.Linear(2, 2)
    progress = Progress()
    progress.record({"epoch": 1, "val_top1": 0.8, "val_loss": 0.5, "elapsed_s": 1.0}, model, keep_weights=False)
    progress.record({"epoch": 2, "val_top1": 0.8, "val_loss": 0.4, "elapsed_s": 2.0}, model, keep_weights=False)
    progress.record({"epoch": 3, "val_top1": 0.8, "val_loss": 0.45, "elapsed_s": 3.0}, model, keep_weights=False)
    assert progress.best["epoch"] == 2 and progress.best_state is None  # only rank 0 keeps weights
    assert progress.elapsed_s() == 3.0


def test_clean_up_removes_only_our_temp_folders(written, tmp_path):
    path = written[0]
    assert os.path.dirname(path) == tempfile.gettempdir()
    assert os.path.basename(path).startswith(LOCAL_CHECKPOINT_PREFIX)

    elsewhere = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}kept"  # our prefix, not in the temp dir
    elsewhere.mkdir()
    stranger = tempfile.mkdtemp(prefix="someone-else-")  # the temp dir, not our prefix
    try:
        for keep in (str(elsewhere), stranger, None, ""):
            discard_local_checkpoint(keep)
        assert elsewhere.is_dir() and os.path.isdir(stranger)
        discard_local_checkpoint(path)
        assert not os.path.exists(path)
    finally:
        os.rmdir(stranger)


def test_a_checkpoint_written_before_timms_scheduler_resumes_where_it_stood(written):
    """Checkpoints of fpc-ray before issue 12 hold torch's LambdaLR state and no step count (a
    killed search or run resumed after an upgrade): the steps come from LambdaLR's own count."""
    path, *_ = written
    state = torch.load(os.path.join(path, STATE), weights_only=True)
    model, optimizer, _ = _parts(1)
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(state["updates"]):
        optimizer.step()
        old.step()
    torch.save({"optimizer": state["optimizer"], "scheduler": old.state_dict(), "epoch": state["epoch"]},
               os.path.join(path, STATE))
    model, optimizer, scheduler = _parts(2)
    progress = resume(path, model, optimizer, scheduler, torch.device("cpu"))
    assert progress.updates == 2 * STEPS and progress.epochs_done == 2
    _, reference_optimizer, reference = _parts(3)
    reference.step_update(2 * STEPS)
    assert current_lr(optimizer) == pytest.approx(current_lr(reference_optimizer))
