"""The training input as Ray Data: rows that name images, decoded by Ray Data tasks on the cluster.

The driver reads the CSVs and cuts each dataset by its own patients (:mod:`fpc_ray.data.multi`);
each split becomes rows of ``(index, root, name, label, patient, dataset)``, a few dozen bytes an
image. Reading, decoding and letterboxing happen in Ray Data tasks (:func:`decode_rows`) on any
node with CPUs, never on the driver, so a split larger than one machine's memory still trains.

The cache policy (``data.cache``) says whether the decoded splits are kept:

- ``memory``: decoded once per run and materialized in Ray's object store, spread over the nodes
  (a search shares them between its trials);
- ``stream``: decoded again every epoch, with Ray Data's bounded, backpressured memory;
- ``auto``: ``memory`` when the decoded splits take at most :data:`MEMORY_FRACTION` of the
  cluster's object store, else ``stream``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fpc_ray.data.fetal_planes import CLASS_NAMES, FetalPlanesDB, Record

# Rows per block and per decode task: 64 images at 224 px are 3.2 MB, small enough to spread a
# split over the nodes and to shuffle between blocks, large enough that a task is not all overhead.
ROWS_PER_BLOCK = 64
# A split gets at least this many blocks (if it has the rows), so that even a small one's decoding
# spreads over several nodes.
MIN_BLOCKS = 8
# auto caches the decoded splits in memory up to this share of the object store: the rest is left
# for the blocks in flight (batches, checkpoints) and for the other runs of a search.
MEMORY_FRACTION = 0.5
# What a decode task reserves: a fraction, so that decoding still runs beside Train workers that
# hold whole CPUs (it reads files and waits on storage as much as it computes).
DECODE_CPUS = 0.25


def split_rows(parts: Sequence, split: str) -> list[dict]:
    """One split of every dataset as rows, in the order of ``parts`` (the order the card counts
    and ``evaluate`` reports per dataset); ``index`` numbers them from 0."""
    rows = []
    for d, part in enumerate(parts):
        root = part.db.root.uri
        for r in part.splits[split]:
            rows.append({"index": len(rows), "root": root, "name": r.image_name, "label": r.label,
                         "patient": r.patient, "dataset": d})
    return rows


def decoded_bytes(rows: int, size: int) -> int:
    """What ``rows`` decoded images take: the S x S uint8 image and the two int64 columns."""
    return rows * (size * size + 16)


def cache_mode(policy: str, decoded: int, object_store: float) -> str:
    """``memory`` or ``stream`` for ``data.cache`` = ``policy`` and ``decoded`` bytes of splits."""
    if policy != "auto":
        return policy
    return "memory" if decoded <= MEMORY_FRACTION * object_store else "stream"


def cache_line(policy: str, mode: str, decoded: int, object_store: float) -> str:
    """The one line that says which cache was chosen, and why."""
    why = (f"auto: {'at most' if mode == 'memory' else 'more than'} {MEMORY_FRACTION:.0%} of the object store"
           if policy == "auto" else "data.cache")
    return f"data cache: {mode} ({why}); decoded splits {_size(decoded)}, object store {_size(object_store)}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def decode_rows(batch: dict[str, np.ndarray], size: int, storage: dict, threads: int) -> dict[str, np.ndarray]:
    """A Ray Data task: read, decode and letterbox each row's image; ``index``, ``label`` and
    ``image`` (N x S x S uint8) out.

    Raises:
        UserError: naming the first image that is missing or cannot be decoded.
    """
    from fpc_ray.config import StorageConfig
    from fpc_ray.data.dataset import load_letterboxed
    from fpc_ray.storage import resolve

    cfg = StorageConfig.model_validate(storage)
    dbs = {root: FetalPlanesDB(resolve(root, cfg), [], "") for root in set(batch["root"].tolist())}

    def load(i: int) -> np.ndarray:
        record = Record(str(batch["name"][i]), int(batch["patient"][i]), CLASS_NAMES[int(batch["label"][i])],
                        "", "", "", False)
        return load_letterboxed(dbs[str(batch["root"][i])], record, size)

    n = len(batch["index"])
    images = np.zeros((n, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(threads, max(1, n))) as pool:
        for i, image in enumerate(pool.map(load, range(n))):
            images[i] = image
    return {"index": batch["index"].astype(np.int64), "label": batch["label"].astype(np.int64), "image": images}


def split_dataset(rows: list[dict], size: int, storage: dict, threads: int):
    """A split's rows as a Ray Dataset whose blocks are decoded by Ray Data tasks (lazily: nothing
    runs until it is materialized or read)."""
    import ray.data

    blocks = max(math.ceil(len(rows) / ROWS_PER_BLOCK), min(len(rows), MIN_BLOCKS), 1)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # batch_size None: one task per block, as cut above (a batch size would merge small blocks).
    return ds.map_batches(decode_rows, fn_kwargs={"size": size, "storage": storage, "threads": threads},
                          batch_size=None, batch_format="numpy", num_cpus=DECODE_CPUS)


def object_store_bytes() -> float:
    """The object store of the cluster this process is connected to, all nodes together."""
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0.0))


def quiet_data_logs() -> None:
    """No progress bars or per-dataset INFO lines from Ray Data: a run prints its own lines."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
