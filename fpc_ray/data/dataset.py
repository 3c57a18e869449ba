"""Decode images into compact letterboxed uint8: a split at once on the driver (the ``arrays``
ingest path, :func:`decode_split`), or image by image in Ray Data's decode tasks (the ``memory``
and ``stream`` paths, :func:`load_letterboxed`; :mod:`fpc_ray.data.ingest` chooses the path).

Decoding a 700x500 PNG costs more than a forward pass of the model at 128 px on a CPU, so every
image is decoded and letterboxed once per run (in threads: PIL and OpenCV release the GIL), except
under ``stream``. On the arrays path a split is kept as ``N x S x S`` uint8 (12,400 images at
224 px take 620 MB); the CPU path serves it image by image through an albumentations transform
(:class:`PlaneDataset`), the device path as index batches of raw uint8 (:class:`IndexBatches`)
augmented on the training device.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from fpc_ray.data.fetal_planes import FetalPlanesDB, Record
from fpc_ray.data.transforms import decode_image_bytes, letterbox
from fpc_ray.errors import UserError, exception_line

# An object's repr, as Python prints one it has no better words for.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass
class SplitArrays:
    """A decoded split: letterboxed images, integer labels and the image names."""

    images: np.ndarray  # N x S x S uint8
    labels: np.ndarray  # N int64
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def decode_problem(data: bytes, err: Exception) -> str:
    """What is wrong with image bytes a decoder refused, in words: PIL's messages name an
    in-memory buffer (``<_io.BytesIO object at 0x...>``), which says nothing to anyone."""
    if not data:
        return "the file is empty (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return f"not a PNG or JPEG image ({len(data)} bytes)"
    return _OBJECT_REPR.sub("the image", exception_line(err))


def load_letterboxed(db: FetalPlanesDB, record: Record, size: int) -> np.ndarray:
    """Read, decode and letterbox one record's image (what every decode task does per row).

    Raises:
        UserError: the image is missing or cannot be decoded, naming it.
    """
    loc, data = db.read_image(record)
    try:
        return letterbox(decode_image_bytes(data), size)
    except Exception as e:
        raise UserError(f"{loc.uri}: cannot decode image ({decode_problem(data, e)})") from None


def decode_split(db: FetalPlanesDB, records: list[Record], size: int, threads: int = 4) -> SplitArrays:
    """Read, decode and letterbox every image of ``records`` in this process (the arrays path).

    Raises:
        UserError: naming the first image that is missing or cannot be decoded.
    """
    images = np.zeros((len(records), size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, image in enumerate(pool.map(lambda r: load_letterboxed(db, r, size), records)):
            images[i] = image
    labels = np.array([r.label for r in records], dtype=np.int64)
    return SplitArrays(images, labels, [r.image_name for r in records])


class PlaneDataset(Dataset):
    """Serves ``(tensor, label)`` from a decoded split through an albumentations transform."""

    def __init__(self, split: SplitArrays, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.split.images[i])["image"], int(self.split.labels[i])


class IndexBatches:
    """A decoded split as one uint8 tensor, served as whole batches on the training device.

    On CUDA the images are copied once into page-locked (pinned) memory, and each batch is gathered
    into one of two pinned staging buffers and copied with ``non_blocking=True``: the copy runs
    while the GPU still trains on the previous batch. A buffer is refilled only after its last copy
    has finished (a CUDA event says so). On the CPU the batch is gathered straight from the array
    (Ray's read-only object-store copy, shared and never written).
    """

    STAGING_BUFFERS = 2

    def __init__(self, split: SplitArrays, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.images = torch.empty(split.images.shape, dtype=torch.uint8, pin_memory=True)
            self.images.numpy()[...] = split.images
            self.labels = torch.from_numpy(np.array(split.labels, np.int64)).pin_memory()
        else:
            with warnings.catch_warnings():  # "not writable": only ever read here
                warnings.simplefilter("ignore", UserWarning)
                self.images = torch.from_numpy(split.images)
                self.labels = torch.from_numpy(split.labels)
        self._staging: list = [None] * self.STAGING_BUFFERS

    def epoch(self, order: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images B x S x S uint8, labels B int64)`` on the device for each full batch of
        ``order`` (a partial last batch is dropped, like the DataLoader's ``drop_last``)."""
        order_t = torch.as_tensor(order, dtype=torch.long)
        for step in range(len(order) // batch_size):
            idx = order_t[step * batch_size : (step + 1) * batch_size]
            if self.cuda:
                yield self._gather_pinned(idx, step % self.STAGING_BUFFERS)
            else:
                yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def _gather_pinned(self, idx: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        staged = self._staging[slot]
        if staged is None or staged[0].shape[0] != len(idx):
            staged = (torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True),
                      torch.empty(len(idx), dtype=torch.long, pin_memory=True), torch.cuda.Event())
        else:
            staged[2].synchronize()  # this buffer's previous copy to the GPU has finished
        torch.index_select(self.images, 0, idx, out=staged[0])
        torch.index_select(self.labels, 0, idx, out=staged[1])
        images = staged[0].to(self.device, non_blocking=True)
        labels = staged[1].to(self.device, non_blocking=True)
        staged[2].record()
        self._staging[slot] = staged
        return images, labels
