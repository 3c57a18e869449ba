"""Which frames of committed labelling runs go to review, in which order.

Only committed runs are read (a ``_SUCCESS.json`` in the run folder), only the columns a choice
needs (never the CAM thumbnails), and never error rows. A frame is named by a ``frame_id``
derived from its content hash and frame index, so a frame relabelled by a later run, or the
same object copied elsewhere in the archive, is one frame for review.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.label.runs import SUCCESS, committed_runs, reading_runs, run_parts
from fpc_ray.review import Strategy
from fpc_ray.storage import Location, resolve

# What a choice and a batch need from a run's rows.
COLUMNS = ("source_uri", "frame", "study_uid", "content_sha256", "label", "confidence", "top2_label",
           "top2_confidence", "model_version", "run_id", "error")


def frame_id(content_sha256: str, frame: int) -> str:
    """A frame's id in review batches: its object's content hash and its index, hashed (16 hex)."""
    return hashlib.sha256(f"{content_sha256}:{frame}".encode()).hexdigest()[:16]


def input_runs(uri: str, storage: StorageConfig | None = None) -> list[Location]:
    """The committed runs a review input names: one run folder, or every committed run under a
    labels prefix.

    Raises:
        UserError: the run folder is not committed, or the prefix holds no committed run.
    """
    loc = resolve(uri, storage)
    if loc.join(SUCCESS).exists():
        return [loc]
    if loc.uri.rstrip("/").rsplit("/", 1)[-1].startswith("run="):
        raise UserError(f"{loc.uri}: this run is not committed (no {SUCCESS}); review reads committed runs only")
    runs = committed_runs(loc)
    if not runs:
        raise UserError(f"{loc.uri}: no committed labelling run (run=<id>/{SUCCESS}) here")
    return sorted(runs, key=lambda r: r.uri)


def read_candidates(runs: list[Location]) -> pa.Table:
    """The labelled rows of the runs (error rows left out), one per frame, with ``frame_id`` and
    ``run_uri``; a frame in several runs keeps the row of the latest run id."""
    import pyarrow.dataset as pads

    tables = []
    for run in runs:
        parts = run_parts(run)
        if not parts:
            continue
        with reading_runs([run]):  # a damaged part: one line naming it
            table = pads.dataset(parts, filesystem=run.fs, format="parquet").to_table(columns=list(COLUMNS))
        table = table.filter(pc.and_(pc.is_null(table["error"]), pc.is_valid(table["label"])))
        tables.append(table.drop_columns(["error"]).append_column(
            "run_uri", pa.array([run.uri] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables, promote_options="default") if tables else None
    if table is None or table.num_rows == 0:  # no parts, or error rows only
        raise UserError(f"no labelled frames in {', '.join(r.uri for r in runs)}")
    ids = [frame_id(s, f) for s, f in zip(table["content_sha256"].to_pylist(), table["frame"].to_pylist(),
                                          strict=True)]
    table = table.append_column("frame_id", pa.array(ids, pa.string()))
    latest = table.sort_by([("run_id", "descending")])
    _, first = _unique_first(latest["frame_id"].to_pylist())
    return latest.take(first)


def _unique_first(values: list[str]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        seen.setdefault(v, i)
    return list(seen), sorted(seen.values())


def ranked(rows: list[dict], strategy: Strategy, n: int, per_class: int | None,
           seed: int) -> tuple[Iterator[dict], int | None]:
    """The candidate rows in the order to export them, and the cap per predicted class.

    least-confident: lowest top-1 confidence first; margin: smallest top-1 minus top-2 first;
    per-class: each predicted class's least confident first, class by class in turn, at most
    ``per_class`` (default: N over the classes present, rounded up) per class; random: a
    seeded shuffle, the control group. Ties break on ``frame_id``, so an order is reproducible.
    """
    if strategy == Strategy.random:
        order = sorted(rows, key=lambda r: r["frame_id"])
        random.Random(seed).shuffle(order)
        return iter(order), None
    if strategy == Strategy.margin:
        return iter(sorted(rows, key=lambda r: (_margin(r), r["frame_id"]))), None
    by_confidence = sorted(rows, key=lambda r: (r["confidence"], r["frame_id"]))
    if strategy == Strategy.least_confident:
        return iter(by_confidence), None
    rank_in_class: dict[str, int] = {}
    keyed = []
    for r in by_confidence:
        rank_in_class[r["label"]] = rank_in_class.get(r["label"], -1) + 1
        keyed.append((rank_in_class[r["label"]], r["confidence"], r["frame_id"], r))
    cap = per_class or math.ceil(n / len(rank_in_class))
    return (k[-1] for k in sorted(keyed, key=lambda k: k[:3])), cap


def _margin(row: dict) -> float:
    top2 = row["top2_confidence"]
    return row["confidence"] - (top2 if top2 is not None else 0.0)
