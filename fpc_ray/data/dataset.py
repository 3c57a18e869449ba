"""Decoding images into letterboxed uint8, per image (:func:`load_letterboxed`, what every Ray Data
decode task of :mod:`fpc_ray.data.ingest` runs) or a split at once in this process
(:func:`decode_split`, the benchmarks' in-memory baseline, served by :class:`PlaneDataset`).

Decoding a 700x500 PNG costs more than a forward pass of the model at 128 px on a CPU, so a run
decodes each image once (the memory cache) or once per epoch spread over the cluster (stream).
"""

from __future__ import annotations

import re
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
    """Read, decode and letterbox every image of ``records`` in this process (the benchmarks'
    in-memory baseline; training reads through :mod:`fpc_ray.data.ingest`).

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
