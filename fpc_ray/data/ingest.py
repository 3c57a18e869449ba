"""Training input at any size: the one choice between two ingest paths, and the Ray Data path.

A run's input takes one of two paths, and :func:`choose_ingest` alone picks it:

- ``arrays`` (small data): the driver decodes every split once into an ``N x S x S`` uint8 array
  (:func:`fpc_ray.data.multi.decode_joined`) and shares it with the workers through the object
  store, as before Ray Data. Measured with ``fpc-ray bench ingest``: for a few thousand images, Ray
  Data's per-epoch start-up costs more than the whole epoch's reading, so this stays the default
  while the decoded splits are small (:data:`ARRAYS_MAX_BYTES`, and a share of the driver's free
  memory).
- Ray Data (data that does not fit): each split becomes rows of ``(index, root, name, label,
  patient, dataset)``, a few dozen bytes an image; reading, decoding and letterboxing run in Ray
  Data tasks (:func:`decode_rows`) on any node with CPUs, never on the driver, so a split larger
  than one machine's memory still trains. ``memory`` materializes the decoded splits once per run
  in Ray's object store, spread over the nodes (a search shares them between its trials);
  ``stream`` decodes them again every epoch, with Ray Data's bounded, backpressured memory.

``data.cache: auto`` chooses ``arrays``, else ``memory`` when the decoded splits take at most
:data:`MEMORY_FRACTION` of the cluster's object store, else ``stream``; ``arrays``, ``memory`` and
``stream`` force one. One line says which was chosen, why, and the decoded size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fpc_ray.data.fetal_planes import CLASS_NAMES, FetalPlanesDB, Record

# Rows per block and per decode task: 64 images at 224 px are 3.2 MB, small enough to spread a
# split over the nodes and to shuffle between blocks, large enough that a task is not all overhead.
ROWS_PER_BLOCK = 64
# A split gets at least this many blocks (if it has the rows), so that even a small one's decoding
# spreads over several nodes.
MIN_BLOCKS = 8
# auto keeps the driver-array path up to this decoded size, and while it takes at most
# DRIVER_FRACTION of the driver's free memory (the driver holds the arrays, and the workers on its
# node map their object-store copy).
ARRAYS_MAX_BYTES = 10**9  # 1 GB: FETAL_PLANES_DB (620 MB at 224 px) stays on this path
DRIVER_FRACTION = 0.25
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


def driver_free_bytes() -> float:
    """Memory this machine can still give (Linux's MemAvailable; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_ingest(policy: str, decoded: int, driver_free: float,
                  object_store: Callable[[], float]) -> tuple[str, str]:
    """The ingest path for ``data.cache`` = ``policy`` and ``decoded`` bytes of splits:
    ``(arrays | memory | stream, why)``. ``object_store`` (the cluster's object store in bytes) is
    asked only where it decides, since asking connects to Ray: a small run never starts a cluster.
    """
    if policy != "auto":
        return policy, "data.cache"
    if decoded <= ARRAYS_MAX_BYTES and decoded <= DRIVER_FRACTION * driver_free:
        return "arrays", (f"auto: at most {_size(ARRAYS_MAX_BYTES)} and {DRIVER_FRACTION:.0%} of the driver's "
                          f"free {_size(driver_free)}")
    store = object_store()
    if decoded <= MEMORY_FRACTION * store:
        return "memory", (f"auto: too large for the driver; at most {MEMORY_FRACTION:.0%} of the object store "
                          f"{_size(store)}")
    return "stream", f"auto: more than {MEMORY_FRACTION:.0%} of the object store {_size(store)}"


def ingest_line(mode: str, why: str, decoded: int) -> str:
    """The one line that says which ingest path was chosen, why, and the decoded size."""
    return f"data ingest: {mode} ({why}); decoded splits {_size(decoded)}"


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
