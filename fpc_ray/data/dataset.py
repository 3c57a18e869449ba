"""Decode a split once into a compact uint8 array, then serve augmented tensors from it.

Decoding a 700x500 PNG costs more than a forward pass of the model at 128 px on a CPU, so every
image is decoded and letterboxed once per run (in threads: PIL and OpenCV release the GIL) and
kept as ``N x S x S`` uint8: 12,400 images at 224 px take 620 MB.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fpc_ray.data.fetal_planes import FetalPlanesDB, Record
from fpc_ray.data.transforms import decode_image_bytes, letterbox
from fpc_ray.errors import UserError


@dataclass
class SplitArrays:
    """A decoded split: letterboxed images, integer labels and the image names."""

    images: np.ndarray  # N x S x S uint8
    labels: np.ndarray  # N int64
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def decode_split(db: FetalPlanesDB, records: list[Record], size: int, threads: int = 4) -> SplitArrays:
    """Read, decode and letterbox every image of ``records``.

    Raises:
        UserError: naming the first image that is missing or cannot be decoded.
    """

    def load(record: Record) -> np.ndarray:
        loc = db.image_location(record)
        data = loc.read_bytes()
        try:
            return letterbox(decode_image_bytes(data), size)
        except Exception as e:
            raise UserError(f"{loc.uri}: cannot decode image ({type(e).__name__}: {e})") from None

    images = np.zeros((len(records), size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, image in enumerate(pool.map(load, records)):
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
