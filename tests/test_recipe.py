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


def test_gpus_per_worker_is_a_fraction_of_one_or_whole_gpus():
    from fpc_ray.errors import UserError

    assert load_config(None, ["train.gpus_per_worker=0.5"]).train.gpus_per_worker == 0.5
    assert load_config(None, ["train.gpus_per_worker=2"]).train.gpus_per_worker == 2
    with pytest.raises(UserError, match="train.gpus_per_worker: 1.5: Ray shares a GPU only in fractions of one"):
        load_config(None, ["train.gpus_per_worker=1.5"])
    with pytest.raises(UserError, match="train.gpus_per_worker"):
        load_config(None, ["train.gpus_per_worker=0"])
    with pytest.raises(UserError, match="data.augment_on"):
        load_config(None, ["data.augment_on=gpu"])


def _worker(*overrides: str):
    """A Worker with what freezing, wrapping and compiling touch (no Ray context, no data)."""
    from fpc_ray.train.checkpoint import Progress
    from fpc_ray.train.loop import Worker

    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.pretrained=none", "data.image_size=32",
                             *overrides])
    model = build_model(cfg.model, 6, pretrained=False)
    return Worker(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), amp=False, data=None,
                  mean=None, std=None, model=model, optimizer=None, scheduler=None, loss_fn=None,
                  progress=Progress(), lines_within_epoch=False)


def test_compile_wraps_the_training_steps_and_leaves_the_validated_model_plain():
    """The plumbing only: compiling itself (on the first step) takes minutes on this 2-core CPU for
    even timm's test_efficientnet at 32 px (inductor builds C++), so the compiled step runs in the
    CUDA test below, on a GPU node."""
    from fpc_ray.train.loop import _prepare_model

    w = _worker("train.compile=true")
    _prepare_model(w, frozen=True)
    compiled = w.wrapped
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is w.model
    _prepare_model(w, frozen=True)  # nothing changed: no new wrapper, no recompile
    assert w.wrapped is compiled
    _prepare_model(w, frozen=False)  # the thaw re-wraps, so it compiles anew
    assert w.wrapped is not compiled and w.wrapped._orig_mod is w.model
    plain = _worker()
    _prepare_model(plain, frozen=False)
    assert plain.wrapped is plain.model


def test_compile_time_is_the_first_steps_extra_and_printed_once(capsys):
    from fpc_ray.train.loop import _compile_seconds

    w = _worker("train.compile=true")
    assert _compile_seconds(w, first_step_s=10.5, train_time=12.5, steps=5) == pytest.approx(10.0)
    assert _compile_seconds(w, first_step_s=0.4, train_time=2.0, steps=5) == 0.0  # no compile: never below 0
    assert capsys.readouterr().out.count("torch.compile: the first training step took 10.0s longer") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.compile of a training step takes "
                                                          "minutes on a CPU")
def test_compiled_training_step_on_cuda():
    from fpc_ray.train.loop import _prepare_model, _train_step
    from fpc_ray.train.recipe import build_loss

    w = _worker("train.compile=true")
    w.device = torch.device("cuda", 0)
    w.model.to(w.device)
    w.optimizer = build_optimizer(w.model, w.cfg.train)
    w.scheduler = build_scheduler(w.optimizer, w.cfg.train, steps_per_epoch=4)
    w.loss_fn = build_loss(w.cfg.train, torch.arange(6).numpy(), 6).to(w.device)
    _prepare_model(w, frozen=False)
    images, labels = torch.randn(4, 3, 32, 32, device=w.device), torch.arange(4, device=w.device)
    losses = [float(_train_step(w, images, labels)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and w.progress.updates == 3


def test_training_flushes_denormals_on_its_thread_and_restores_the_mode():
    """Ray Train's worker thread computes denormals slowly (~18 % of CPU training): flushed while
    training, and left as found (an in-process run trains on the caller's thread)."""
    import numpy as np

    from fpc_ray.train.loop import denormals_flushed

    def denormal() -> float:
        return float(np.float32(1e-39) * np.float32(1.0))

    assert denormal() != 0.0
    with denormals_flushed():
        assert denormal() == 0.0
    assert denormal() != 0.0
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed():
            pass
        assert denormal() == 0.0  # a caller that flushed them itself keeps them flushed
    finally:
        torch.set_flush_denormal(False)
