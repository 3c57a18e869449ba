"""The per-worker training function that Ray Train runs (and Tune trials reuse).

The images come from one of the two ingest paths (:mod:`fpc_ray.train.inputs`: the decoded arrays,
or this worker's Ray Data shard). Batches then take one of two paths (``data.augment_on``): an
albumentations transform per image (the CPU path), or whole uint8 batches augmented on the training
device (:mod:`fpc_ray.train.batch_augment`; the GPU path).

Each epoch ends with ``ray.train.report(metrics, checkpoint)``: the checkpoint
(:mod:`fpc_ray.train.checkpoint`) carries weights, optimizer and scheduler state and the history,
so a worker group that fails resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from fpc_ray.config import Config
from fpc_ray.data.transforms import train_transform
from fpc_ray.inference import autocast, place_model, predict_probs, to_device
from fpc_ray.model import build_model, normalization
from fpc_ray.train.batch_augment import BatchAugment, augment_seed, augments_on_device
from fpc_ray.train.checkpoint import Progress, discard_local_checkpoint, resume, save_checkpoint
from fpc_ray.train.inputs import ArrayInput, ShardInput
from fpc_ray.train.recipe import build_loss, build_optimizer, build_scheduler, current_lr, seed_everything


def quiet_report_logs() -> None:
    """Silence Ray Train's INFO line per report (metrics and all): our progress line says it once.

    In-process its ``Reported metrics`` line comes from a logger under ``ray.train``. On a worker
    the ``Reporting training result`` line comes from a logger that Ray names by its source file
    (``logging.getLogger(__file__)``), outside the ``ray.train`` hierarchy and so outside
    ``LoggingConfig``'s level filter, which matches ``ray.train`` names only: it is reached by
    that name. Should a Ray release move that file, the line comes back: noise, not an error.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    package = os.path.dirname(ray.train.__file__)
    logging.getLogger(os.path.join(package, "v2", "_internal", "execution", "context.py")).setLevel(logging.WARNING)


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


@dataclass
class Worker:
    """One worker's share of a run: its rank, its data, what it trains and where the run stands."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    amp: bool
    data: ArrayInput | ShardInput  # this worker's batches and its share of val
    mean: tuple
    std: tuple
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's CosineLRScheduler, stepped per optimizer step
    loss_fn: torch.nn.Module
    progress: Progress
    lines_within_epoch: bool  # a progress line each quarter epoch (rank 0, in a terminal)
    augment: BatchAugment | None = None  # the device path's augmentation (None on the CPU path)
    wrapped: torch.nn.Module | None = None  # the model, in DDP with several workers
    frozen: bool | None = None  # whether ``wrapped`` was made with the backbone frozen
    kept_locally: str | None = None  # the previous epoch's checkpoint folder, in an in-process run
    compile_printed: bool = False  # the compile time is printed once per worker process


def set_up_worker(config: dict) -> Worker:
    """Data, model, optimizer, scheduler and loss for this worker; resumed from Ray's checkpoint."""
    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(tc.seed)  # same on every rank: identical initial heads before DDP's broadcast
    on_device = augments_on_device(cfg.data.augment_on, device)
    if config["ingest"] == "arrays":
        train = _get(config["train"])
        train_labels = train.labels
        data = ArrayInput(train, _get(config["val"]), rank, world, tc.batch_size, tc.seed, device, on_device,
                          cfg.data.loader_workers)
    else:
        train_labels = _get(config["train_labels"])
        data = ShardInput(len(train_labels), rank, world, tc.batch_size, device)
    class_names = config["class_names"]
    mean, std = normalization(cfg.model.backbone)

    init_weights = _get(config.get("init_weights"))
    model = build_model(cfg.model, len(class_names), cfg.storage, pretrained=init_weights is None)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    place_model(model, device)

    # Built here, while every parameter is trainable: timm leaves frozen ones out of the optimizer,
    # and the backbone, frozen during the first epochs, must be in it when it thaws.
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch=max(1, data.steps))
    worker = Worker(
        cfg=cfg, rank=rank, world=world, device=device, amp=tc.amp and device.type == "cuda",
        data=data, mean=mean, std=std, model=model, optimizer=optimizer, scheduler=scheduler,
        loss_fn=build_loss(tc, train_labels, len(class_names)).to(device),
        progress=Progress(), lines_within_epoch=bool(config.get("progress_within_epoch")) and rank == 0,
    )
    if on_device:
        worker.augment = BatchAugment(cfg.data.augment, mean, std, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            worker.progress = resume(path, model, optimizer, scheduler, device)
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {worker.progress.epochs_done} of {tc.epochs}", flush=True)
    return worker


def _train_step(w: Worker, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch, then the scheduler's per-step update; the batch's loss."""
    images = to_device(images, w.device)
    labels = labels.to(w.device, non_blocking=True)
    with autocast(w.device, w.amp):
        logits = w.wrapped(images)
    loss = w.loss_fn(logits.float(), labels)
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if w.cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), w.cfg.train.grad_clip)
    w.optimizer.step()
    w.progress.updates += 1
    w.scheduler.step_update(w.progress.updates)
    return loss.detach()


def _prepare_model(w: Worker, frozen: bool) -> None:
    """Freeze or thaw the backbone; DDP wraps the parameters trainable at wrapping time, so a
    change re-wraps (and, with ``train.compile``, recompiles: the guards see new requires_grad)."""
    if frozen == w.frozen:
        return
    w.model.set_backbone_trainable(not frozen)
    w.wrapped, w.frozen = _wrap(w.model, w.world), frozen
    if w.cfg.train.compile:
        # The training steps only: validation runs the plain model (once per epoch, not worth it).
        w.wrapped = torch.compile(w.wrapped)


def _epoch_batches(w: Worker, epoch: int):
    """This worker's ``(images, labels)`` batches of one epoch, full batches only.

    The order, the augmentation and torch's global generator (dropout) are seeded afresh per
    epoch and rank on every path: a run resumed from an epoch's checkpoint replays the same draws.
    """
    seed = augment_seed(w.cfg.train.seed, epoch, w.rank)
    torch.manual_seed(seed)
    transform = None if w.augment is not None else train_transform(w.cfg.data.augment, w.mean, w.std, seed=seed)
    return w.data.epoch(epoch, seed, w.augment, transform)


def run_epoch(w: Worker, epoch: int) -> dict:
    """Train one epoch (0-based) on this worker's share; the epoch's training metrics, all workers'."""
    tc = w.cfg.train
    frozen = epoch < tc.frozen_epochs
    _prepare_model(w, frozen)
    batches = _epoch_batches(w, epoch)
    steps = w.data.steps
    w.wrapped.train()
    t0 = time.perf_counter()
    # The loss is summed on the device: reading it each step would wait for the GPU each step.
    loss_sum, seen, first_step_s = torch.zeros((), dtype=torch.float64, device=w.device), 0, 0.0
    quarter = max(1, steps // 4) if w.lines_within_epoch else 0
    for step, (images, labels) in enumerate(batches, 1):
        loss_sum += _train_step(w, images, labels).double() * len(labels)
        seen += len(labels)
        if step == 1 and tc.compile:
            loss_sum.item()  # waits for the first step, compilation included
            first_step_s = time.perf_counter() - t0
        if quarter and step % quarter == 0 and step < steps:
            print(f"epoch {epoch + 1}/{tc.epochs}  {100 * step // steps}%  loss {loss_sum.item() / seen:.4f}  "
                  f"{seen / (time.perf_counter() - t0):.1f} img/s (this worker)", flush=True)
    loss_value = loss_sum.item()  # waits for the last step: the time below is the device's too
    train_time = time.perf_counter() - t0
    loss_total, seen_total = _all_reduce_sum([loss_value, seen], w.device)
    metrics = {"epoch": epoch + 1, "train_loss": loss_total / max(seen_total, 1),
               "images_per_s": seen_total / max(train_time, 1e-9), "lr": current_lr(w.optimizer),
               "backbone_frozen": frozen}
    if tc.compile:
        metrics["compile_s"] = _compile_seconds(w, first_step_s, train_time, steps)
    return metrics


def _compile_seconds(w: Worker, first_step_s: float, train_time: float, steps: int) -> float:
    """The first step's time beyond an average later step: what ``torch.compile`` cost this epoch
    (about 0 in epochs that compiled nothing). Rank 0 prints it once, after its first epoch."""
    later = (train_time - first_step_s) / (steps - 1) if steps > 1 else 0.0
    compile_s = max(0.0, first_step_s - later)
    if w.rank == 0 and not w.compile_printed:
        w.compile_printed = True
        print(f"torch.compile: the first training step took {compile_s:.1f}s longer than the others", flush=True)
    return compile_s


def validate(w: Worker) -> dict:
    """Each worker scores every world-th validation image; sums are all-reduced, so it is exact."""
    batch_size = 2 * w.cfg.train.batch_size
    sums = np.zeros(4)
    for images, labels in w.data.val_share(batch_size):
        if not len(labels):
            continue
        probs = predict_probs(w.model, images, w.mean, w.std, batch_size, w.device, w.amp)
        top2 = np.argsort(-probs, axis=1)[:, :2]
        sums += [float((top2[:, 0] == labels).sum()), float((top2 == labels[:, None]).any(1).sum()),
                 float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).sum()), len(labels)]
    top1, top2_, nll, n = _all_reduce_sum(sums.tolist(), w.device)
    n = max(n, 1)
    return {"val_top1": top1 / n, "val_top2": top2_ / n, "val_loss": nll / n}


def report(w: Worker, metrics: dict) -> None:
    """Report the epoch to Ray Train; rank 0 prints its line and attaches the checkpoint."""
    if w.rank != 0:
        ray.train.report(metrics)
        return
    print(
        f"epoch {metrics['epoch']}/{w.cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
        f"val_top1 {metrics['val_top1']:.4f}  val_top2 {metrics['val_top2']:.4f}  "
        f"{metrics['images_per_s']:.1f} img/s  {metrics['elapsed_s']:.0f}s"
        + ("  (backbone frozen)" if metrics["backbone_frozen"] else ""),
        flush=True,
    )
    path = save_checkpoint(w.model, w.optimizer, w.scheduler, w.progress)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path),
                     delete_local_checkpoint_after_upload=True)
    if os.path.isdir(path):  # an in-process run: this folder is now the latest checkpoint
        discard_local_checkpoint(w.kept_locally)
        w.kept_locally = path


def train_loop_per_worker(config: dict) -> None:
    """Train on one worker. ``config`` holds plain values and (on a cluster) object refs.

    Keys: ``cfg`` (a Config dump), ``ingest`` (``arrays``, ``memory`` or ``stream``), ``class_names``,
    ``init_weights`` (optional state dict to start from, for retraining), ``progress_within_epoch``;
    on the arrays path ``train`` / ``val`` (SplitArrays), on the Ray Data path ``train_labels`` (the
    train split's labels, for the class weights and the step count) with the images in the dataset
    shards ``train`` and ``val``.
    """
    quiet_report_logs()
    with denormals_flushed():
        w = set_up_worker(config)
        for epoch in range(w.progress.epochs_done, w.cfg.train.epochs):
            started = time.perf_counter()
            metrics = run_epoch(w, epoch)
            metrics.update(validate(w))
            metrics["elapsed_s"] = w.progress.elapsed_s() + time.perf_counter() - started
            w.progress.record(metrics, w.model, keep_weights=w.rank == 0)
            report(w, metrics)


@contextlib.contextmanager
def denormals_flushed():
    """Denormal floats flushed to zero on this thread's CPU while training, then as they were.

    Ray Train runs the training function on a thread of its worker, where CPU training measured
    ~18 % slower than the same loop on a process's main thread (50.5 vs 62.4 images/s, 2 cores)
    and as fast with denormals flushed (61.7): slow denormal arithmetic, which GPUs flush anyway.
    """
    was = float(np.float32(1e-39) * np.float32(1.0)) == 0.0  # x86 keeps no readable flag in torch
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)
