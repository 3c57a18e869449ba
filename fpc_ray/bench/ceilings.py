"""What the node itself can do, measured in the bench's own run: the ceilings fpc-ray is held to.

Each ceiling is the bare operation with nothing of fpc-ray around it: decoding in a pool of
processes on every core (OpenCV, one thread each), nvJPEG batched on the GPU, and the model's
forward pass and training step on random tensors already on the device.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import torch

from fpc_ray.data.transforms import letterbox

WARMUP_STEPS, TIMED_STEPS = 3, 10


def _decode_files(paths: list[str], size: int) -> int:
    """Read, decode to gray and letterbox each file; runs in a pool process, one thread."""
    cv2.setNumThreads(1)
    for path in paths:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        letterbox(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE), size)
    return len(paths)


def cpu_decode_per_s(archives: dict[str, list[str]], size: int, processes: int | None = None) -> dict[str, float]:
    """Images/s of read + decode + letterbox of each archive's files on ``processes`` processes
    (default: every core), one archive after the other on one pool."""
    processes = processes or os.cpu_count() or 1
    rates = {}
    # Spawned, not forked: a fork of a process whose torch and OpenCV thread pools are running
    # can deadlock in the child.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_decode_files, [[]] * processes, [size] * processes))  # start (import) every worker
        for name, paths in archives.items():
            chunks = [paths[i::processes * 4] for i in range(processes * 4)]
            t0 = time.perf_counter()
            done = sum(pool.map(_decode_files, chunks, [size] * len(chunks)))
            rates[name] = done / (time.perf_counter() - t0)
    return rates


def nvjpeg_per_s(paths: list[str], size: int, batch: int = 256) -> float | None:
    """Images/s of batched nvJPEG decoding (``torchvision.io.decode_jpeg`` on CUDA) plus the resize
    to the model's input; the files are read into memory first. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))

    def run(chunk):
        images = decode_jpeg(chunk, mode=ImageReadMode.GRAY, device="cuda")
        for image in images:
            torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)

    try:
        run(blobs[:batch])
    except RuntimeError as e:  # torchvision built without nvJPEG, or nvJPEG refused this GPU
        print(f"  nvJPEG unavailable: {str(e).splitlines()[0][:200]}", flush=True)
        return None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        run(blobs[i:i + batch])
    torch.cuda.synchronize()
    return len(blobs) / (time.perf_counter() - t0)


def _timed_steps(step, device: torch.device) -> float:
    """Seconds per call of ``step`` after warm-up, synchronised on the device."""
    for _ in range(WARMUP_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / TIMED_STEPS


def _inputs(batch: int, size: int, device: torch.device) -> torch.Tensor:
    from fpc_ray.inference import to_device

    return to_device(torch.randn(batch, 3, size, size), device)  # in the layout place_model gives the model


def inference_per_s(model: torch.nn.Module, batch: int, size: int, device: torch.device,
                    compile_model: bool = False) -> tuple[float, float | None]:
    """(images/s of the forward pass + softmax, compile seconds or None): bf16 autocast on CUDA."""
    from fpc_ray.inference import autocast, place_model

    model = place_model(model, device).eval()
    x = _inputs(batch, size, device)
    compile_s = None
    if compile_model:
        model = torch.compile(model)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            model(x)
        compile_s = time.perf_counter() - t0

    def step():
        with torch.inference_mode(), autocast(device):
            model(x).float().softmax(1)

    return batch / _timed_steps(step, device), compile_s


def train_step_per_s(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> float:
    """Images/s of forward, loss, backward and a (fused on CUDA) AdamW step, every weight trainable."""
    from fpc_ray.inference import autocast, place_model

    model = place_model(model, device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = _inputs(batch, size, device)
    y = torch.randint(0, 6, (batch,), device=device)

    def step():
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / _timed_steps(step, device)
