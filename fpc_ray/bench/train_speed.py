"""Training throughput of ``fpc-ray train`` (one Ray worker) over a plain PyTorch loop.

Both sides train the same model on the same decoded images with the same augmentation, batch
size and optimiser, on all of this machine's cores, for the same epochs; the first epoch of
each is warm-up and is not counted. Backbone freezing is off so every epoch does the same work.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from fpc_ray.config import Config
from fpc_ray.data.dataset import PlaneDataset, decode_split
from fpc_ray.data.fetal_planes import CLASS_NAMES, read_fetal_planes
from fpc_ray.data.transforms import train_transform
from fpc_ray.model import build_model, normalization
from fpc_ray.train.recipe import build_loss, build_optimizer, build_scheduler, seed_everything


def plain_loop_images_per_s(cfg: Config, data_uri: str) -> float:
    """A bare single-process PyTorch training loop; images/s over epochs 2..N."""
    db = read_fetal_planes(data_uri, cfg.storage)
    train = decode_split(db, db.split("train", cfg.data.val_fraction, cfg.data.split_seed),
                         cfg.data.image_size, cfg.data.decode_threads)
    seed_everything(cfg.train.seed)
    mean, std = normalization(cfg.model.backbone)
    model = build_model(cfg.model, len(CLASS_NAMES), cfg.storage)
    model.set_backbone_trainable(True)
    tc = cfg.train
    loader = DataLoader(PlaneDataset(train, train_transform(cfg.data.augment, mean, std, seed=tc.seed)),
                        batch_size=tc.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.loader_workers)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, len(loader))
    loss_fn = build_loss(tc, train.labels, len(CLASS_NAMES))
    rates, updates = [], 0
    for _ in range(tc.epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - t0))
    return sum(rates[1:]) / len(rates[1:])


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()  # the baseline runs on a machine without Ray's daemons, as it would in real life


def run_benchmark(cfg: Config, data_uri: str) -> list[str]:
    """Measure both sides in this process's run and return the report lines."""
    from fpc_ray.train.driver import run_training

    cores = os.cpu_count() or 1
    cfg = cfg.model_copy(deep=True)
    cfg.train.frozen_epochs = 0
    cfg.train.num_workers = 1
    cfg.train.cpus_per_worker = float(cores)  # Ray sets the worker's torch threads from this
    torch.set_num_threads(cores)

    # The baseline runs before and after fpc-ray and is averaged, so drift in the machine's
    # speed (shared hosts) lands on both sides instead of on one.
    before = plain_loop_images_per_s(cfg, data_uri)
    with tempfile.TemporaryDirectory(prefix="fpc-bench-") as tmp:
        t0 = time.perf_counter()
        outcome = run_training(cfg, data_uri, os.path.join(tmp, "bundle"))
        ray_wall = time.perf_counter() - t0
    _shutdown_ray()
    after = plain_loop_images_per_s(cfg, data_uri)
    plain = (before + after) / 2
    rates = [h["images_per_s"] for h in outcome.history[1:]]
    ours = sum(rates) / len(rates)
    ratio = ours / plain
    return [
        f"setup: {cfg.model.backbone} + {cfg.model.attention.type}, {cfg.data.image_size} px, "
        f"batch {cfg.train.batch_size}, {cfg.train.epochs} epochs (first is warm-up), {cores} cores",
        f"plain PyTorch loop         {plain:8.1f} images/s  (before {before:.1f}, after {after:.1f})",
        f"fpc-ray train, 1 worker    {ours:8.1f} images/s  (wall {ray_wall:.0f}s with Ray start-up, "
        f"decode, validation and test)",
        f"ratio fpc-ray / plain      {ratio:8.3f}  (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})",
    ]
