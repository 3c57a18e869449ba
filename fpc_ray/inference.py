"""Running a model: the device, the memory layout, bf16 autocast and batched logits and probabilities.

Training (validation), labelling and evaluation all place a model and run it through these
functions, so a GPU gets the same channels_last + bf16 treatment everywhere, and every
probability comes from :func:`softmax_t` with the bundle's temperature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fpc_ray.data.transforms import eval_transform


def select_device(use_gpu: bool) -> torch.device:
    """The first CUDA device when asked for and present, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, channels_last on CUDA (convolutions run NHWC there)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An NCHW batch on ``device``, in the layout :func:`place_model` gave the model."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def transform_batch(images: Sequence[np.ndarray], transform: Callable, device: torch.device) -> torch.Tensor:
    """Letterboxed uint8 images -> one normalised NCHW batch on ``device``."""
    return to_device(torch.stack([transform(image=im)["image"] for im in images]), device)


def softmax_t(logits, temperature: float = 1.0):
    """Class probabilities from logits divided by ``temperature`` (a bundle's calibration; 1.0 for
    a bundle without one). The one place logits become probabilities: training's test report,
    evaluation and labelling all call it. A positive temperature never changes the argmax.

    Takes an N x C torch tensor (returns one, float32) or NumPy array (returns float32 NumPy).
    """
    if isinstance(logits, np.ndarray):
        return softmax_t(torch.tensor(logits), temperature).numpy()  # a copy: Ray returns read-only arrays
    return (logits.float() / temperature).softmax(dim=1)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray, mean, std, batch_size: int = 64,
                   device: torch.device | str = "cpu", amp: bool = True) -> np.ndarray:
    """Float32 logits for letterboxed uint8 images (N x S x S), in the model's class order."""
    device = torch.device(device)
    transform = eval_transform(mean, std)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = transform_batch(images[start : start + batch_size], transform, device)
        with autocast(device, amp):
            logits = model(batch)
        out.append(logits.float().cpu().numpy())
    n_classes = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def predict_probs(model: torch.nn.Module, images: np.ndarray, mean, std, batch_size: int = 64,
                  device: torch.device | str = "cpu", amp: bool = True, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities (of the logits over ``temperature``) for letterboxed uint8 images."""
    return softmax_t(predict_logits(model, images, mean, std, batch_size, device, amp), temperature)
