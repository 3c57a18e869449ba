"""The optimisation recipe: seeding, AdamW (timm's parameter groups), timm's warm-up + cosine schedule,
balanced loss."""

from __future__ import annotations

import random

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from fpc_ray.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW through timm, with no weight decay on biases and norm parameters (timm's 1-D filter).

    timm groups only the parameters that require a gradient, so this must run while every
    parameter is trainable: before frozen epochs freeze the backbone. Then the backbone is in the
    optimizer when it thaws (AdamW skips parameters whose gradient is None meanwhile).
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"build the optimizer before freezing parameters ({len(frozen)} frozen, e.g. {frozen[0]}): "
                         "frozen ones would never be trained")
    return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, filter_bias_and_bn=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 1 % of the peak, per optimizer step.

    Step it with ``step_update(updates)`` after each optimizer step (``updates``: steps done); the
    learning rate it sets is the next step's. The warm-up's W steps run at peak x 1/W, 2/W, ...,
    1; the cosine starts at the last of them and reaches 1 % after the run's last step.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    ramp = max(0, warmup - 1)  # timm's warm-up steps before the cosine's first (peak) step
    return CosineLRScheduler(optimizer, t_initial=total - ramp, lr_min=0.01 * cfg.lr, warmup_t=ramp,
                             warmup_lr_init=cfg.lr / warmup if warmup else 0.0, warmup_prefix=True,
                             t_in_epochs=False)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next optimizer step uses (every group shares it)."""
    return optimizer.param_groups[0]["lr"]


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
