"""Training augmentation of whole batches in torch, on the training device (the GPU's path).

The same families and ranges as :func:`fpc_ray.data.transforms.train_transform`'s albumentations
2.0 pipeline (which stays the CPU path), applied in the same order to a ``B x H x W`` uint8 batch,
then :class:`~fpc_ray.data.transforms.ModelInput`'s normalisation, so a model trained either way
sees the same input contract. Each parameter mirrors the albumentations transform it replaces:

- ``Affine(rotate=±r, scale=1±s, translate_percent=±t, p=0.8)``: angle, x scale and y scale drawn
  independently (albumentations' ``keep_ratio=False``), the shift truncated to whole pixels
  (``int(u * width)``), about the pixel centre ``(w/2 - 0.5, h/2 - 0.5)``, bilinear, zero fill.
- ``HorizontalFlip(p)``.
- ``RandomBrightnessContrast(0.2, 0.2)``: ``x * (1 + c) + 255 * b`` (``brightness_by_max``), clipped.
- ``RandomGamma((80, 120))``: ``255 * (x / 255) ** g``, ``g`` in [0.8, 1.2].
- ``GaussNoise(std_range=(0.02, 0.08))``: per-pixel noise of standard deviation ``255 * u``, clipped.
- ``GaussianBlur(blur_limit=(3, 5))``: sigma in [0.5, 3], kernel size ``randint(3, 5)`` made odd
  (3 with odd 1/3, 5 with odd 2/3), separable, reflect-101 borders (OpenCV's default).

Differences, all below what a model can tell apart: the batch stays float from the first step to
the last, where albumentations rounds to uint8 after each (its gamma table truncates); OpenCV's
bilinear warp uses 5-bit fixed-point weights, ``grid_sample`` exact ones; and the draws come from a
torch generator, so a sample gets other numbers than the CPU path would give it, from the same
distributions. Every parameter is drawn for every sample of a batch whether or not its transform
fires, so the generator's stream depends only on the batch count: a resumed epoch replays it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fpc_ray.config import AugmentConfig
from fpc_ray.data.dataset import IndexBatches
from fpc_ray.data.transforms import ModelInput

AFFINE_P = 0.8  # train_transform's Affine probability
BRIGHTNESS_LIMIT = CONTRAST_LIMIT = 0.2
GAMMA_RANGE = (0.8, 1.2)
NOISE_STD_RANGE = (0.02, 0.08)  # of the 0..255 range
BLUR_SIGMA_RANGE = (0.5, 3.0)
BLUR_TAPS = 5  # the largest kernel; a 3-tap one is a 5-tap kernel with zero ends


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The augmentation seed of one epoch on one rank, the same on both paths: a resumed run,
    restarted at an epoch boundary, draws what the interrupted one drew."""
    return seed * 100003 + epoch * 1009 + rank


def augments_on_device(augment_on: str, device: torch.device) -> bool:
    """``data.augment_on`` resolved: ``auto`` is the device on CUDA and the CPU pipeline otherwise
    (so CPU training keeps its measured speed)."""
    if augment_on == "auto":
        return device.type == "cuda"
    return augment_on == "device"


def affine_theta(angle_deg: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor, shift_x: torch.Tensor,
                 shift_y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``B x 2 x 3`` matrices for ``F.affine_grid`` (``align_corners=False``) that warp like
    albumentations' Affine with these parameters (its matrix is ``shift_back @ translate @ rotate
    @ scale @ shift_to_centre``, mapping source pixels to output pixels; ``affine_grid`` wants
    output to source, in coordinates normalised by the half sizes)."""
    rad = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # inverse(rotate @ scale) = inverse(scale) @ transpose(rotate); rotate = [[cos, sin], [-sin, cos]]
    a00, a01 = cos / scale_x, -sin / scale_x
    a10, a11 = sin / scale_y, cos / scale_y
    half_w, half_h = width / 2, height / 2
    row0 = torch.stack([a00, a01 * half_h / half_w, -(a00 * shift_x + a01 * shift_y) / half_w], dim=-1)
    row1 = torch.stack([a10 * half_w / half_h, a11, -(a10 * shift_x + a11 * shift_y) / half_h], dim=-1)
    return torch.stack([row0, row1], dim=1)


class BatchAugment:
    """``B x H x W`` uint8 on the device -> normalised ``B x 3 x H x W`` float32, augmented."""

    def __init__(self, aug: AugmentConfig, mean, std, device: torch.device):
        self.aug = aug
        self.device = device
        model_input = ModelInput(mean, std)  # the one definition of the normalisation
        self.scale = torch.from_numpy(model_input.scale).to(device)
        self.offset = torch.from_numpy(model_input.offset).to(device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self._generator, self._n = generator, len(images)
        x = images.to(torch.float32).unsqueeze(1)  # B x 1 x H x W in 0..255
        a = self.aug
        if a.rotate_limit or a.scale_limit or a.shift_limit:
            x = self._affine(x)
        x = torch.where(self._fires(a.hflip_p), x.flip(-1), x)
        x = self._brightness_contrast(x)
        gamma = self._uniform(*GAMMA_RANGE)
        x = torch.where(self._fires(a.gamma_p), 255 * (x / 255).pow(gamma), x)
        noise = torch.randn(x.shape, generator=generator, device=x.device) * (255 * self._uniform(*NOISE_STD_RANGE))
        x = torch.where(self._fires(a.noise_p), (x + noise).clamp(0, 255), x)
        x = torch.where(self._fires(a.blur_p), self._blur(x), x)
        return x * self.scale - self.offset  # ModelInput's arithmetic; 1 channel broadcast to 3

    def _uniform(self, low: float, high: float) -> torch.Tensor:
        """One draw per sample, shaped to broadcast over ``B x 1 x H x W``."""
        u = torch.rand(self._n, generator=self._generator, device=self.device)
        return (low + (high - low) * u).view(-1, 1, 1, 1)

    def _fires(self, p: float) -> torch.Tensor:
        return self._uniform(0.0, 1.0) < p

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        a, (h, w) = self.aug, x.shape[-2:]
        fires = self._fires(AFFINE_P)
        angle = self._uniform(-a.rotate_limit, a.rotate_limit).flatten()
        scale_x = self._uniform(1 - a.scale_limit, 1 + a.scale_limit).flatten()
        scale_y = self._uniform(1 - a.scale_limit, 1 + a.scale_limit).flatten()
        shift_x = torch.trunc(self._uniform(-a.shift_limit, a.shift_limit).flatten() * w)
        shift_y = torch.trunc(self._uniform(-a.shift_limit, a.shift_limit).flatten() * h)
        theta = affine_theta(angle, scale_x, scale_y, shift_x, shift_y, h, w)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(fires, warped, x)

    def _brightness_contrast(self, x: torch.Tensor) -> torch.Tensor:
        fires = self._fires(self.aug.brightness_contrast_p)
        alpha = 1 + self._uniform(-CONTRAST_LIMIT, CONTRAST_LIMIT)
        beta = 255 * self._uniform(-BRIGHTNESS_LIMIT, BRIGHTNESS_LIMIT)
        return torch.where(fires, (x * alpha + beta).clamp(0, 255), x)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample blurred with its own separable Gaussian kernel."""
        sigma = self._uniform(*BLUR_SIGMA_RANGE).view(-1, 1)
        # randint(3, 5) as albumentations draws it; its 4 is made odd, 5, and 4 // 2 == 5 // 2 here
        size = torch.randint(3, 6, (self._n, 1), generator=self._generator, device=self.device)
        taps = torch.arange(BLUR_TAPS, device=self.device) - BLUR_TAPS // 2
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2) * (taps.abs() <= size // 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(-1, BLUR_TAPS, 1, 1, 1)  # B x 5 taps
        h, w = x.shape[-2:]
        pad = BLUR_TAPS // 2
        # A sum of shifted copies, not a grouped convolution: several times faster on a CPU.
        y = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # torch's reflect is OpenCV's reflect-101
        y = sum(kernel[:, k] * y[..., k : k + w] for k in range(BLUR_TAPS))  # along rows
        return sum(kernel[:, k] * y[..., k : k + h, :] for k in range(BLUR_TAPS))  # along columns


def augmented_batches(batches: IndexBatches, augment: BatchAugment, order: list[int], batch_size: int,
                      seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(images, labels)`` on the device: full batches in ``order`` (the sampler's),
    augmented with draws from a generator seeded with ``seed``."""
    generator = torch.Generator(device=augment.device).manual_seed(seed)
    for images, labels in batches.epoch(order, batch_size):
        yield augment(images, generator), labels

