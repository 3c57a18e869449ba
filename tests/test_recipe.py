"""The optimisation recipe: timm's AdamW groups and timm's warm-up + cosine schedule (no Ray)."""

from __future__ import annotations

import pytest
import torch

from fpc_ray.config import TrainConfig, load_config
from fpc_ray.model import build_model
from fpc_ray.train.recipe import build_optimizer, build_scheduler, current_lr


def _schedule(cfg: TrainConfig, steps_per_epoch: int, updates: int) -> list[float]:
    """The learning rate of each of ``updates`` optimizer steps, stepped as the loop steps it."""
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for done in range(1, updates + 1):
        lrs.append(current_lr(optimizer))
        scheduler.step_update(done)
    return lrs + [current_lr(optimizer)]  # and the one reported after the last step


def test_optimizer_holds_the_backbone_and_decays_only_matrices():
    cfg = load_config(None, ["data.image_size=64"])
    model = build_model(cfg.model, 6, pretrained=False)
    optimizer = build_optimizer(model, cfg.train)  # before frozen epochs freeze the backbone
    model.set_backbone_trainable(False)
    in_optimizer = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    backbone = list(model.backbone.parameters())
    assert backbone and all(id(p) in in_optimizer for p in backbone)  # trained once it thaws
    assert len(in_optimizer) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        expected = 0.0 if p.ndim <= 1 or name.endswith(".bias") else cfg.train.weight_decay
        assert in_optimizer[id(p)] == expected, name
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, cfg.train.weight_decay}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_optimizer_built_after_freezing_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="before freezing"):
        build_optimizer(model, TrainConfig())


def test_schedule_warms_up_peaks_and_decays_to_one_percent():
    cfg = TrainConfig(epochs=10, lr=2e-3, warmup_epochs=0.5)
    lrs = _schedule(cfg, steps_per_epoch=10, updates=100)  # warm-up: 5 steps
    assert lrs[:5] == pytest.approx([cfg.lr * k / 5 for k in range(1, 6)])  # linear, from peak/5
    assert max(lrs) == pytest.approx(cfg.lr)
    decay = lrs[4:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # cosine: never rises again
    assert lrs[52] == pytest.approx(cfg.lr * (0.01 + 0.99 / 2), rel=0.02)  # half-way down the cosine
    assert lrs[-1] == pytest.approx(0.01 * cfg.lr)  # 1 % of the peak after the last step
    assert min(lrs) == pytest.approx(0.01 * cfg.lr)


def test_schedule_without_warm_up_starts_at_the_peak():
    cfg = TrainConfig(epochs=2, lr=1e-3, warmup_epochs=0, frozen_epochs=0)
    lrs = _schedule(cfg, steps_per_epoch=4, updates=8)
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[-1] == pytest.approx(0.01 * cfg.lr)


def test_resumed_scheduler_continues_where_it_stopped():
    cfg = TrainConfig(epochs=4, lr=1e-3, warmup_epochs=1)
    straight = _schedule(cfg, steps_per_epoch=5, updates=20)

    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 5)
    for done in range(1, 8):  # stopped after 7 steps, mid-warm-up's end
        scheduler.step_update(done)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    fresh_optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    fresh = build_scheduler(fresh_optimizer, cfg, 5)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    fresh.load_state_dict(saved["scheduler"])
    fresh.step_update(7)
    resumed = [current_lr(fresh_optimizer)]
    for done in range(8, 21):
        fresh.step_update(done)
        resumed.append(current_lr(fresh_optimizer))
    assert resumed == pytest.approx(straight[7:])
