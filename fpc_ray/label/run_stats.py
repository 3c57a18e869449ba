"""What a labelling run's rows look like in aggregate: the ``stats`` of its ``_SUCCESS.json``.

:func:`run_stats` is a pure function of a run's small columns (never ``gradcam_png``), so the
commit records it and ``fpc-ray drift`` computes the same thing from the Parquet of a run
committed before ``stats`` existed. Histograms have fixed bins, written into the stats, so runs
months apart compare bin for bin.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from fpc_ray.label.schema import LABEL_SCHEMA, error_kind

STATS_VERSION = 1
HISTOGRAM_BINS = 20  # on [0, 1]: confidence and the top-1 / top-2 margin
# Long side of the frame in pixels: a new machine or preset often shows as a new frame size.
SIZE_BUCKETS = ((0, 512, "<512"), (512, 1024, "512-1023"), (1024, 2048, "1024-2047"),
                (2048, None, ">=2048"))
UNKNOWN = "unknown"  # an input kind or a frame size the rows do not say (runs before the column)
STATS_COLUMNS = ("label", "confidence", "top2_confidence", "probabilities", "width", "height",
                 "input_kind", "error")
CLASS_NAMES_KEY = b"fpc_ray.class_names"


def read_stats_table(parts: list[str], fs: pafs.FileSystem, columns: tuple[str, ...] = STATS_COLUMNS) -> pa.Table:
    """The stats columns (or some of them) of some LABEL_SCHEMA parts, read by column projection.

    The dataset is read under LABEL_SCHEMA's fields, so a part written before a column existed
    (``input_kind``) reads it as nulls instead of failing; the first part's metadata (class names)
    is kept.
    """
    import pyarrow.dataset as pads

    schema = pa.schema([LABEL_SCHEMA.field(c) for c in columns])
    if not parts:
        return schema.empty_table()
    dataset = pads.dataset(parts, schema=schema, filesystem=fs, format="parquet")
    metadata = pads.dataset(parts[:1], filesystem=fs, format="parquet").schema.metadata
    return dataset.to_table(columns=list(columns)).replace_schema_metadata(metadata)


def class_names_of(table: pa.Table) -> list[str] | None:
    """The model's class names, from the Parquet metadata the labeller writes (None without it)."""
    raw = (table.schema.metadata or {}).get(CLASS_NAMES_KEY)
    return json.loads(raw) if raw else None


def _histogram(values: np.ndarray) -> dict:
    counts, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return {"bins": [round(float(e), 4) for e in edges], "counts": counts.tolist(),
            "mean": round(float(values.mean()), 6) if values.size else None}


def _counts(values: pa.ChunkedArray) -> dict[str, int]:
    """Rows per value, nulls counted as ``unknown``."""
    counted = pc.value_counts(pc.fill_null(values, UNKNOWN)).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counted, key=lambda c: -c["counts"])}


def _size_buckets(width: pa.ChunkedArray, height: pa.ChunkedArray) -> dict[str, int]:
    """Frames per SIZE_BUCKETS label of their long side (``unknown`` without a size)."""
    side = pc.max_element_wise(width, height, skip_nulls=False).to_numpy(zero_copy_only=False).astype(np.float64)
    known = side[~np.isnan(side)]  # a null width or height reads as NaN
    counts = {name: int(((known >= low) & (known < (high or np.inf))).sum()) for low, high, name in SIZE_BUCKETS}
    counts[UNKNOWN] = int(len(side) - len(known))
    return {k: v for k, v in counts.items() if v}


def _mean_probabilities(probabilities: pa.ChunkedArray, class_names: list[str] | None) -> dict | None:
    probabilities = probabilities.drop_null()
    k = len(class_names or [])
    if not len(probabilities) or not k or pc.any(pc.not_equal(pc.list_value_length(probabilities), k)).as_py():
        return None
    mean = pc.list_flatten(probabilities).to_numpy().astype(np.float64).reshape(-1, k).mean(axis=0)
    return {name: round(float(v), 6) for name, v in zip(class_names, mean, strict=True)}


def low_confidence_share(confidence: pa.ChunkedArray, threshold: float) -> dict:
    """The ``low_confidence`` stat: labelled frames (those with a confidence) below ``threshold``."""
    conf = confidence.drop_null().to_numpy().astype(np.float64)
    return {"threshold": threshold, "frames": int((conf < threshold).sum()),
            "share": round(float((conf < threshold).mean()), 6) if conf.size else None}


def run_stats(table: pa.Table, low_confidence: float, class_names: list[str] | None = None) -> dict:
    """The aggregate of one run's rows (STATS_COLUMNS; class names from the table's metadata
    unless given), computed column-wise so a run of millions of frames stays cheap.

    Class mix, confidence, margin, input kinds and frame sizes are over the labelled frames;
    errors are over every row. ``low_confidence`` is the threshold of the low-confidence share
    (``drift.low_confidence``), recorded beside it.
    """
    class_names = class_names or class_names_of(table)
    labelled = table.filter(pc.is_valid(table["label"]))
    scored = labelled.filter(pc.is_valid(labelled["confidence"]))  # every labelled row, from the labeller
    conf = scored["confidence"].to_numpy().astype(np.float64)
    second = pc.fill_null(scored["top2_confidence"], 0.0).to_numpy().astype(np.float64)
    errors = table["error"].drop_null().to_pylist()
    by_class = _counts(labelled["label"])
    return {
        "version": STATS_VERSION,
        "rows": table.num_rows,
        "labelled": labelled.num_rows,
        "errors": len(errors),
        "errors_by_kind": dict(Counter(error_kind(e) for e in errors)),
        "class_names": class_names,
        "by_class": {n: by_class.get(n, 0) for n in class_names or []} | by_class,
        "confidence": _histogram(conf),
        "low_confidence": low_confidence_share(scored["confidence"], low_confidence),
        "margin": _histogram(conf - second),
        "input_kind": _counts(labelled["input_kind"]),
        "frame_size": _size_buckets(labelled["width"], labelled["height"]),
        "mean_probabilities": _mean_probabilities(labelled["probabilities"], class_names),
    }
