"""Batched augmentation on the training device: each family against the albumentations transform it
mirrors, the normalisation against ModelInput's, the seeding, and a short in-process training run
that checkpoints and resumes (all on the CPU; the CUDA-only parts skip without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpc_ray.config import AugmentConfig
from fpc_ray.data.dataset import IndexBatches, SplitArrays
from fpc_ray.data.transforms import eval_transform, letterbox
from fpc_ray.train.batch_augment import (
    BatchAugment,
    affine_theta,
    augment_seed,
    augmented_batches,
    augments_on_device,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")
OFF = {"rotate_limit": 0, "scale_limit": 0, "shift_limit": 0, "hflip_p": 0, "brightness_contrast_p": 0,
       "gamma_p": 0, "noise_p": 0, "blur_p": 0}


def _only(**on) -> AugmentConfig:
    return AugmentConfig(**{**OFF, **on})


def _images(n: int = 6, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Letterboxed phantom-like frames: smooth gradients plus texture, black padding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size * 4 // 3]
    frames = []
    for _ in range(n):
        smooth = 100 + 60 * np.sin(xx / rng.uniform(4, 9)) * np.cos(yy / rng.uniform(4, 9))
        frames.append(letterbox(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8), size))
    return torch.from_numpy(np.stack(frames))


def _run(aug: AugmentConfig, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return BatchAugment(aug, MEAN, STD, CPU)(images, torch.Generator().manual_seed(seed))


def _gray(batch: torch.Tensor) -> torch.Tensor:
    """The normalised batch back on the 0..255 scale (channel 0; the three are equal)."""
    return (batch[:, 0] * STD[0] + MEAN[0]) * 255


def test_nothing_on_is_modelinputs_normalisation():
    images = _images()
    got = _run(AugmentConfig(**OFF), images)
    want = torch.stack([eval_transform(MEAN, STD)(image=im.numpy())["image"] for im in images])
    assert got.shape == want.shape == (6, 3, 48, 48) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_hflip_flips_every_image_at_p1_and_none_at_p0():
    images = _images()
    flipped = _run(_only(hflip_p=1.0), images)
    plain = _run(AugmentConfig(**OFF), images)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("angle", "sx", "sy", "tx", "ty"), [(10.0, 1.0, 1.0, 0, 0), (-7.5, 0.9, 1.1, 2, -3),
                                                             (0.0, 1.1, 0.95, -2, 1)])
def test_affine_warps_like_albumentations(angle, sx, sy, tx, ty):
    """The same parameters through albumentations' matrix and OpenCV's warp, and through
    ``affine_theta`` and ``grid_sample``, give the same image (up to OpenCV's fixed-point bilinear
    weights and its uint8 rounding)."""
    import cv2
    from albumentations.augmentations.geometric import functional as fgeometric

    image = _images(1, size=40)[0].numpy()
    h, w = image.shape
    matrix = fgeometric.create_affine_transformation_matrix(
        {"x": tx, "y": ty}, {"x": 0.0, "y": 0.0}, {"x": sx, "y": sy}, angle, fgeometric.center((h, w)))
    want = cv2.warpAffine(image, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0).astype(np.float32)
    theta = affine_theta(*(torch.tensor([float(v)]) for v in (angle, sx, sy, tx, ty)), h, w)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, h, w], align_corners=False)
    got = torch.nn.functional.grid_sample(torch.from_numpy(image).float()[None, None], grid,
                                          align_corners=False)[0, 0].numpy()
    assert np.abs(got - want).max() <= 2.0
    assert np.abs(got - want).mean() < 0.3


def test_affine_moves_about_eight_in_ten():
    images = _images(64, size=32)
    plain = _run(AugmentConfig(**OFF), images)
    moved = (_run(_only(rotate_limit=10), images) - plain).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.6 < moved.float().mean() < 0.95  # p = 0.8


def test_brightness_contrast_within_albumentations_ranges():
    images = _images()
    x = images.float()
    y = _gray(_run(_only(brightness_contrast_p=1.0), images))
    for xi, yi in zip(x, y, strict=True):
        inside = (yi > 1) & (yi < 254)  # not clipped
        a = torch.stack([xi[inside], torch.ones_like(xi[inside])], dim=1)
        alpha, beta = torch.linalg.lstsq(a.double(), yi[inside].double()[:, None]).solution.flatten().tolist()
        assert 0.8 - 1e-3 <= alpha <= 1.2 + 1e-3
        assert -0.2 * 255 - 0.1 <= beta <= 0.2 * 255 + 0.1
        assert not (abs(alpha - 1) < 1e-4 and abs(beta) < 1e-2)  # p=1: every image changed


def test_gamma_within_80_to_120_percent():
    images = _images()
    y = _gray(_run(_only(gamma_p=1.0), images))
    x = images.double()
    for xi, yi in zip(x, y.double(), strict=True):
        mid = (xi > 20) & (xi < 235)
        gamma = torch.log(yi[mid].clamp_min(1e-6) / 255) / torch.log(xi[mid] / 255)
        assert float(gamma.std()) < 1e-3  # one gamma per image
        assert 0.8 - 1e-3 <= float(gamma.mean()) <= 1.2 + 1e-3


def test_noise_std_within_2_to_8_percent():
    images = torch.full((32, 48, 48), 128, dtype=torch.uint8)
    residual = _gray(_run(_only(noise_p=1.0), images)) - 128
    sigma = residual.flatten(1).std(dim=1) / 255
    assert bool(((sigma > 0.018) & (sigma < 0.082)).all()), sigma
    assert float(sigma.max() - sigma.min()) > 0.01  # drawn per image


def test_blur_is_albumentations_kernel_with_reflect_101_borders():
    """A delta on a flat patch reveals each image's kernel: albumentations' 1-D Gaussian of some
    sigma in [0.5, 3] and size 3 or 5; the whole image is OpenCV's sepFilter2D with that kernel."""
    import cv2
    from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d

    images = _images(24, size=32).clone()
    images[:, 10:23, 10:23] = 0
    images[:, 16, 16] = 255
    out = _gray(_run(_only(blur_p=1.0), images))
    sizes = set()
    for image, blurred in zip(images.numpy(), out.numpy(), strict=True):
        row = blurred[16, 12:21].astype(np.float64)
        support = np.flatnonzero(row > 1e-4)
        size = len(support)
        sizes.add(size)
        kernel = row[support] / row[support].sum()
        sigma = np.sqrt(-0.5 / np.log(kernel[size // 2 - 1] / kernel[size // 2]))
        assert size in (3, 5) and 0.5 - 1e-3 <= sigma <= 3.0 + 1e-3
        assert np.allclose(kernel, create_gaussian_kernel_1d(sigma, size), atol=1e-5)
        want = cv2.sepFilter2D(image.astype(np.float32), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(blurred - want).max() < 1e-2
    assert sizes == {3, 5}


def test_index_batches_follow_the_order_and_drop_the_partial_batch():
    split = SplitArrays(_images(10).numpy(), np.arange(10, dtype=np.int64), [str(i) for i in range(10)])
    order = [3, 1, 4, 9, 5, 2, 6, 0, 8, 7]
    batches = list(IndexBatches(split, CPU).epoch(order, 4))
    assert len(batches) == 2
    for step, (images, labels) in enumerate(batches):
        want = order[step * 4 : (step + 1) * 4]
        assert labels.tolist() == want
        assert torch.equal(images, torch.from_numpy(split.images[want]))


def test_same_seed_replays_an_epoch_and_other_epochs_differ():
    split = SplitArrays(_images(12).numpy(), np.zeros(12, dtype=np.int64), [""] * 12)
    batches, augment = IndexBatches(split, CPU), BatchAugment(AugmentConfig(), MEAN, STD, CPU)
    order = list(range(12))

    def epoch(n: int) -> list[torch.Tensor]:
        return [images for images, _ in augmented_batches(batches, augment, order, 4, augment_seed(7, n, 0))]

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert augment_seed(7, 1, 1) == 7 * 100003 + 1009 + 1  # the CPU path's seed, unchanged


def test_augment_on_auto_is_the_device_only_on_cuda():
    assert augments_on_device("auto", torch.device("cuda", 0))
    assert not augments_on_device("auto", CPU)
    assert augments_on_device("device", CPU)
    assert not augments_on_device("cpu", torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned staging and device draws")
def test_cuda_batches_come_from_pinned_memory_and_replay():
    device = torch.device("cuda", 0)
    split = SplitArrays(_images(12).numpy(), np.arange(12, dtype=np.int64), [""] * 12)
    batches, augment = IndexBatches(split, device), BatchAugment(AugmentConfig(), MEAN, STD, device)
    assert batches.images.is_pinned()
    order = list(range(11, -1, -1))
    runs = [list(augmented_batches(batches, augment, order, 4, 5)) for _ in range(2)]
    for (a, la), (b, lb) in zip(*runs, strict=True):
        assert a.device.type == "cuda" and torch.equal(a, b) and torch.equal(la, lb)
    assert runs[0][0][1].tolist() == order[:4]


def _loop_config(**train) -> dict:
    """A tiny run of the real training function: timm's test_efficientnet at 32 px, 24 images."""
    from fpc_ray.config import load_config
    from fpc_ray.data.fetal_planes import CLASS_NAMES

    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.pretrained=none", "data.image_size=32",
                             "data.augment_on=device", "train.epochs=2", "train.batch_size=4",
                             *(f"train.{k}={v}" for k, v in train.items())])
    labels = np.arange(30, dtype=np.int64) % len(CLASS_NAMES)
    images = _images(30, size=32, seed=3).numpy()
    images[np.arange(30), labels * 5, :] = 255  # a bright row that says the class: something to learn
    return {"cfg": cfg.model_dump(mode="json"), "ingest": "arrays", "class_names": list(CLASS_NAMES),
            "init_weights": None, "train": SplitArrays(images[:24], labels[:24], [""] * 24),
            "val": SplitArrays(images[24:], labels[24:], [""] * 6), "progress_within_epoch": False}


def _fit_in_process(train_fn, config: dict):
    """Ray Train's in-process run (``num_workers=0``), as ``fpc-ray train`` does it by default."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name="augment-on-device"))
    return trainer.fit().checkpoint


class _Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_in_process_run_on_device_augmentation_checkpoints_and_resumes_the_same_run(monkeypatch, capsys):
    """One run straight through; one that dies at the start of its second epoch and is resumed
    from the first epoch's checkpoint (as Ray Train restarts a worker group). The resumed epoch
    replays the same batches, augmentation draws and dropout: the same weights at the end."""
    from safetensors.torch import load_file

    from fpc_ray.train import loop
    from fpc_ray.train.checkpoint import WEIGHTS, discard_local_checkpoint, read_history

    def finished(checkpoint) -> tuple[dict, list[dict]]:
        with checkpoint.as_directory() as path:
            weights, (history, _) = load_file(f"{path}/{WEIGHTS}"), read_history(path)
        discard_local_checkpoint(checkpoint.path)
        return weights, history

    config = _loop_config(frozen_epochs=1)
    straight, straight_history = finished(_fit_in_process(loop.train_loop_per_worker, config))
    assert [h["epoch"] for h in straight_history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and h["images_per_s"] > 0 for h in straight_history)

    real_run_epoch, crashed = loop.run_epoch, []

    def dies_in_epoch_two(w, epoch):
        if epoch == 1 and not crashed:
            crashed.append(ray_checkpoint_path())
            raise _Crash("worker lost")
        return real_run_epoch(w, epoch)

    def ray_checkpoint_path() -> str:
        import ray.train

        return ray.train.get_checkpoint().path

    def restarted(cfg):
        try:
            loop.train_loop_per_worker(cfg)
        except _Crash:
            loop.train_loop_per_worker(cfg)  # the restarted group: Ray Train hands it the checkpoint

    monkeypatch.setattr(loop, "run_epoch", dies_in_epoch_two)
    resumed, resumed_history = finished(_fit_in_process(restarted, config))
    discard_local_checkpoint(crashed[0])
    assert crashed and "resumed from the checkpoint of epoch 1 of 2" in capsys.readouterr().out
    assert [h["epoch"] for h in resumed_history] == [1, 2]
    timing = {"elapsed_s", "images_per_s"}
    for a, b in zip(straight_history, resumed_history, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    loop.seed_everything(0)  # the run's initial weights, as set_up_worker built them
    init = loop.build_model(loop.Config.model_validate(config["cfg"]).model, 6, pretrained=False).state_dict()
    assert not torch.equal(init["head.fc3.weight"], straight["head.fc3.weight"])  # it trained
