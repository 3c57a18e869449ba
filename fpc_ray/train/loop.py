"""The per-worker training function that Ray Train runs (and Tune trials reuse).

Each epoch ends with ``ray.train.report(metrics, checkpoint)``: the checkpoint carries weights,
optimizer and scheduler state and the history, so a worker group that fails resumes from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fpc_ray.config import Config
from fpc_ray.data.dataset import PlaneDataset, SplitArrays
from fpc_ray.data.transforms import train_transform
from fpc_ray.inference import autocast, place_model, predict_probs, to_device
from fpc_ray.model import build_model, normalization
from fpc_ray.train.recipe import build_loss, build_optimizer, build_scheduler, seed_everything

WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"  # only when the best epoch is not the checkpoint's own
STATE = "state.pt"
HISTORY = "history.json"
LOCAL_CHECKPOINT_PREFIX = "fpc-ckpt-"  # the folders each epoch writes before Ray takes them


def selection_score(metrics: dict) -> tuple[float, float]:
    """How checkpoints are ranked: val top-1, then lower val loss breaks ties."""
    return metrics["val_top1"], -metrics["val_loss"]


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO, metrics and all; our progress line says it once.

    That logger is named by its file path, so it is reached through its module.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray release that moved it: its lines are noise, not an error
        return
    context.logger.setLevel(logging.WARNING)


def _get(value):
    """Data arrive as Ray object refs on a cluster and as plain objects in-process."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _wrap(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """DDP over the parameters that are trainable now (re-wrapped when the backbone thaws)."""
    if world_size <= 1:
        return model
    device = ray.train.torch.get_device()
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _validate(model, val: SplitArrays, mean, std, batch_size, device, amp, rank, world) -> dict:
    """Each worker scores every world-th validation image; sums are all-reduced, so it is exact."""
    idx = np.arange(rank, len(val), world)
    probs = predict_probs(model, val.images[idx], mean, std, batch_size, device, amp)
    labels = val.labels[idx]
    if len(idx):
        top2 = np.argsort(-probs, axis=1)[:, :2]
        sums = [float((top2[:, 0] == labels).sum()), float((top2 == labels[:, None]).any(1).sum()),
                float(-np.log(np.clip(probs[np.arange(len(idx)), labels], 1e-12, 1)).sum()), len(idx)]
    else:
        sums = [0.0, 0.0, 0.0, 0.0]
    top1, top2_, nll, n = _all_reduce_sum(sums, device)
    n = max(n, 1)
    return {"val_top1": top1 / n, "val_top2": top2_ / n, "val_loss": nll / n}


def discard_local_checkpoint(path: str | None) -> None:
    """Remove a checkpoint folder this loop wrote to the temp dir, once nothing needs it.

    Ray deletes it after uploading to the run's storage, except in an in-process run
    (``ScalingConfig(num_workers=0)``), where the folder itself is the checkpoint: there each
    epoch's would stay behind in /tmp (about 70 MB each).
    """
    if path and os.path.basename(path).startswith(LOCAL_CHECKPOINT_PREFIX) \
            and os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _save_checkpoint(model, optimizer, scheduler, epoch: int, history: list[dict], best: dict,
                     best_state: dict | None) -> str:
    """Weights, optimizer/scheduler state and history; plus the best weights when they differ.

    Carrying the best weights in the latest checkpoint makes the run's result independent of
    which checkpoints Ray keeps (in-process runs keep only the last one).
    """
    path = tempfile.mkdtemp(prefix=LOCAL_CHECKPOINT_PREFIX)
    save_file(_cpu_state(model), os.path.join(path, WEIGHTS))
    if best_state is not None and best["epoch"] != epoch + 1:
        save_file(best_state, os.path.join(path, BEST_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch}, os.path.join(path, STATE))
    with open(os.path.join(path, HISTORY), "w") as f:
        json.dump({"history": history, "best": best}, f)
    return path


def train_loop_per_worker(config: dict) -> None:
    """Train on one worker. ``config`` holds plain values and (on a cluster) object refs.

    Keys: ``cfg`` (a Config dump), ``train`` / ``val`` (SplitArrays), ``class_names``,
    ``init_weights`` (optional state dict to start from, for retraining).
    """
    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    _quiet_report_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = tc.amp and on_gpu
    seed_everything(tc.seed)  # same on every rank: identical initial heads before DDP's broadcast

    train: SplitArrays = _get(config["train"])
    val: SplitArrays = _get(config["val"])
    class_names = config["class_names"]
    mean, std = normalization(cfg.model.backbone)

    init_weights = _get(config.get("init_weights"))
    model = build_model(cfg.model, len(class_names), cfg.storage, pretrained=init_weights is None)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    place_model(model, device)

    sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=tc.seed, drop_last=len(train) >= world * tc.batch_size)
    steps_per_epoch = max(1, len(sampler) // tc.batch_size)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    loss_fn = build_loss(tc, train.labels, len(class_names)).to(device)

    start_epoch, history, best, best_state = 0, [], {}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            model.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=str(device)))
            best_path = os.path.join(path, BEST_WEIGHTS)
            best_state = load_file(best_path) if os.path.exists(best_path) else _cpu_state(model)
            state = torch.load(os.path.join(path, STATE), map_location=device, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            with open(os.path.join(path, HISTORY)) as f:
                saved = json.load(f)
        start_epoch, history, best = state["epoch"] + 1, saved["history"], saved["best"]
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {start_epoch} of {tc.epochs}", flush=True)

    wrapped, frozen = None, None
    kept_locally = None  # the previous epoch's checkpoint folder, in an in-process run
    for epoch in range(start_epoch, tc.epochs):
        want_frozen = epoch < tc.frozen_epochs
        if want_frozen != frozen:
            model.set_backbone_trainable(not want_frozen)
            wrapped, frozen = _wrap(model, world), want_frozen
        sampler.set_epoch(epoch)
        # A fresh, epoch-seeded augmentation per epoch makes a resumed run replay the same draws.
        transform = train_transform(cfg.data.augment, mean, std, seed=tc.seed * 100003 + epoch * 1009 + rank)
        loader = DataLoader(PlaneDataset(train, transform), batch_size=tc.batch_size, sampler=sampler,
                            drop_last=True, num_workers=cfg.data.loader_workers,
                            pin_memory=on_gpu, persistent_workers=False)
        wrapped.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        quarter = max(1, len(loader) // 4) if config.get("progress_within_epoch") and rank == 0 else 0
        for step, (images, labels) in enumerate(loader, 1):
            images = to_device(images, device)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = wrapped(images)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            seen += len(labels)
            if quarter and step % quarter == 0 and step < len(loader):
                print(f"epoch {epoch + 1}/{tc.epochs}  {100 * step // len(loader)}%  loss {loss_sum / seen:.4f}  "
                      f"{seen / (time.perf_counter() - t0):.1f} img/s (this worker)", flush=True)
        train_time = time.perf_counter() - t0
        loss_total, seen_total = _all_reduce_sum([loss_sum, seen], device)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_total / max(seen_total, 1),
            "images_per_s": seen_total / max(train_time, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            "backbone_frozen": want_frozen,
        }
        metrics.update(_validate(model, val, mean, std, 2 * tc.batch_size, device, amp, rank, world))
        metrics["elapsed_s"] = (history[-1]["elapsed_s"] if history else 0.0) + time.perf_counter() - t0
        history.append(metrics)
        if not best or selection_score(metrics) > selection_score(best):
            best = dict(metrics)
            best_state = _cpu_state(model) if rank == 0 else None

        if rank == 0:
            print(
                f"epoch {epoch + 1}/{tc.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_top1 {metrics['val_top1']:.4f}  val_top2 {metrics['val_top2']:.4f}  "
                f"{metrics['images_per_s']:.1f} img/s  {metrics['elapsed_s']:.0f}s"
                + ("  (backbone frozen)" if want_frozen else ""),
                flush=True,
            )
            path = _save_checkpoint(model, optimizer, scheduler, epoch, history, best, best_state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path),
                             delete_local_checkpoint_after_upload=True)
            if os.path.isdir(path):  # an in-process run: this folder is now the latest checkpoint
                discard_local_checkpoint(kept_locally)
                kept_locally = path
        else:
            ray.train.report(metrics)
