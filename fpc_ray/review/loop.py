"""The nightly review loop: the night's least certain frames go out, reviewers' answers come back
as a dataset, and production is retrained on the base data plus every reviewed dataset.

Two steps, each one command of ``jobs/review_loop.py``, kept apart because the second waits on
people:

1. after the night's labelling run commits, :func:`export_night` writes a review batch under
   ``BATCHES/<UTC timestamp>/`` (batches side by side, so no frame is exported twice);
2. when a batch's annotation export arrives, :func:`ingest_answers` imports it into
   ``DATASETS/<batch name>/`` and retrains from production with ``--data BASE`` plus every
   dataset under ``DATASETS``; the pointer moves only if the candidate is promoted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from fpc_ray.config import Config, StorageConfig
from fpc_ray.data.fetal_planes import CSV_NAME
from fpc_ray.errors import UserError, printable
from fpc_ray.review.export import ExportOptions, export_batch
from fpc_ray.review.importer import import_answers
from fpc_ray.storage import resolve


def batch_name(now: dt.datetime | None = None) -> str:
    """A batch's folder name: its UTC creation time, so batches sort in the order they were made."""
    return f"{now or dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def export_night(labels: str, batches: str, opts: ExportOptions, storage: StorageConfig | None = None,
                 echo: Callable[[str], None] = print) -> dict:
    """A new review batch ``BATCHES/<timestamp>/`` from every committed run under ``labels``."""
    output = resolve(batches, storage).join(batch_name()).uri
    summary = export_batch([labels], output, opts, storage, echo)
    echo(printable(f"review batch {summary['batch']}: {summary['frames']} frames from {summary['runs']} run(s) "
                   f"({summary['already_exported']} exported before); by class {summary['by_class']}"))
    return summary


def imported_datasets(datasets: str, storage: StorageConfig | None = None) -> list[str]:
    """Every reviewed dataset under ``datasets`` (a folder holding the FETAL_PLANES_DB CSV), by name."""
    import pyarrow.fs as pafs

    root = resolve(datasets, storage)
    names = sorted(f.base_name for f in root.entries() if f.type == pafs.FileType.Directory)
    return [root.join(n).uri for n in names if root.join(n, CSV_NAME).exists()]


def ingest_answers(annotations: str, batch: str, datasets: str, base_data: Sequence[str], pointer: str,
                   candidates: str, cfg: Config, margin: float = 0.01, test_fraction: float = 0.2,
                   echo: Callable[[str], None] = print):
    """Import a batch's answers into ``DATASETS/<batch name>/``, then retrain from production on
    ``base_data`` plus every reviewed dataset; returns the retrain's decision.

    Raises:
        UserError: a bad export (nothing written), a batch already imported, bad locations.
    """
    from fpc_ray.train.retrain import retrain

    storage = cfg.storage
    name = resolve(batch, storage).uri.rstrip("/").rsplit("/", 1)[-1]
    target = resolve(datasets, storage).join(name)
    if target.join(CSV_NAME).exists():
        raise UserError(f"{printable(batch)}: already imported as {printable(target.uri)}; nothing to do")
    agreement = import_answers(annotations, batch, target.uri, test_fraction, storage=storage, echo=echo)
    echo(printable(f"imported {agreement['reviewed']} reviewed frames into {target.uri}; the model agreed on "
                   f"{agreement['agreement']:.1%} of them"))
    data = [*base_data, *imported_datasets(datasets, storage)]
    echo(printable(f"retraining from {pointer} on {len(data)} datasets: {', '.join(data)}"))
    decision = retrain(cfg, data, pointer, candidates, margin, echo=echo)
    echo(printable(decision.line))
    return decision
