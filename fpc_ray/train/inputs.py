"""A training worker's input, from either ingest path (:func:`fpc_ray.data.ingest.choose_ingest`).

Both classes answer the loop's three questions the same way: how many full batches an epoch has
(``steps``, equal on every worker), this worker's batches of an epoch, and its share of val.

- :class:`ArrayInput` (``arrays``): the decoded splits arrive whole (object refs on a cluster);
  a seeded ``DistributedSampler`` deals this worker its indices each epoch.
- :class:`ShardInput` (``memory`` / ``stream``): the images come from this worker's Ray Data shard
  (``ray.train.get_dataset_shard``), shuffled per epoch with a seeded local buffer.

On either path the CPU path augments with albumentations per image, the device path whole uint8
batches on the training device (``augment``, a :class:`~fpc_ray.train.batch_augment.BatchAugment`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray.train
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fpc_ray.data.dataset import IndexBatches, PlaneDataset, SplitArrays
from fpc_ray.data.ingest import ROWS_PER_BLOCK
from fpc_ray.train.batch_augment import BatchAugment, augmented_batches

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class ArrayInput:
    """The arrays path: whole decoded splits, this worker's indices from a seeded sampler."""

    def __init__(self, train: SplitArrays, val: SplitArrays, rank: int, world: int, batch_size: int,
                 seed: int, device: torch.device, on_device: bool, loader_workers: int):
        self.train, self.val, self.rank, self.world = train, val, rank, world
        self.batch_size, self.device, self.loader_workers = batch_size, device, loader_workers
        self.sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=len(train) >= world * batch_size)
        self.steps = len(self.sampler) // batch_size  # full batches only, on both augment paths
        self.batches = IndexBatches(train, device) if on_device else None

    def epoch(self, epoch: int, seed: int, augment: BatchAugment | None, transform) -> Batches:
        self.sampler.set_epoch(epoch)
        if augment is not None:
            return augmented_batches(self.batches, augment, list(self.sampler), self.batch_size, seed)
        return iter(DataLoader(PlaneDataset(self.train, transform), batch_size=self.batch_size, sampler=self.sampler,
                               drop_last=True, num_workers=self.loader_workers,
                               pin_memory=self.device.type == "cuda", persistent_workers=False))

    def val_share(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every world-th validation image, as one ``(uint8 images, labels)`` pair."""
        idx = np.arange(self.rank, len(self.val), self.world)
        yield self.val.images[idx], self.val.labels[idx]


def shuffle_buffer(batch_size: int) -> int:
    """Rows of the seeded local shuffle: several blocks' worth (the driver shuffled the rows once
    before cutting them into blocks, so blocks are already a random mix)."""
    return max(4 * ROWS_PER_BLOCK, 2 * batch_size)


class ShardInput:
    """The Ray Data path: this worker's shard of train (``streaming_split(equal=True)`` gives every
    worker ``len // world`` rows), and all of val, of which it scores every world-th row."""

    def __init__(self, train_rows: int, rank: int, world: int, batch_size: int, device: torch.device):
        self.rank, self.world, self.batch_size, self.device = rank, world, batch_size, device
        self.train, self.val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        self.steps = train_rows // world // batch_size

    def epoch(self, epoch: int, seed: int, augment: BatchAugment | None, transform) -> Batches:
        """The shuffle is seeded per epoch and rank: a resumed epoch replays its draws where the
        shard's blocks arrive in the same order (as one worker's do)."""
        shuffle = {"batch_size": self.batch_size, "drop_last": True,
                   "local_shuffle_buffer_size": shuffle_buffer(self.batch_size), "local_shuffle_seed": seed}
        if augment is not None:
            generator = torch.Generator(device=augment.device).manual_seed(seed)
            for batch in self.train.iter_torch_batches(device=self.device, pin_memory=self.device.type == "cuda",
                                                       **shuffle):
                yield augment(batch["image"], generator), batch["label"]
            return
        # Albumentations in this worker, on the batch Ray Data prefetched: measured no slower than
        # in Ray Data tasks on 2 cores, and it keeps the shard's rows as compact uint8 until here.
        for batch in self.train.iter_batches(batch_format="numpy", prefetch_batches=2, **shuffle):
            images = torch.stack([transform(image=image)["image"] for image in batch["image"]])
            yield images, torch.from_numpy(np.array(batch["label"], np.int64))  # writable

    def val_share(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This worker's validation rows (by row index), batch by batch."""
        for batch in self.val.iter_batches(batch_size=batch_size, batch_format="numpy"):
            mine = batch["index"] % self.world == self.rank
            if mine.any():
                yield batch["image"][mine], batch["label"][mine]
