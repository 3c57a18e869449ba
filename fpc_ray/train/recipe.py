"""The optimisation recipe: seeding, AdamW groups, warm-up + cosine schedule, balanced loss."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from fpc_ray.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm parameters (1-D tensors) get no weight decay.

    Frozen parameters are included so the optimizer need not be rebuilt when they thaw; AdamW
    skips parameters whose gradient is None.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step linear warm-up for ``warmup_epochs``, then cosine decay to 1 % of the peak."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over the classes present (absent classes get 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    present = counts > 0
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def build_loss(cfg: TrainConfig, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    """Cross-entropy with label smoothing, class-balanced when ``class_balance == 'loss'``."""
    weight = class_weights(train_labels, num_classes) if cfg.class_balance == "loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
