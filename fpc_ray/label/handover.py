"""What the split design's stages hand each other (see :mod:`fpc_ray.label.split`), and its two CPU
stages: :func:`decode_stage` before the predictors and :func:`overlay_stage` after them.

Blocks are Arrow tables with explicit types: fixed-size uint8 tensor columns for the frames
(Ray Data's tensor extension type, numpy arrays again in the next stage's batch) and
:data:`LABEL_SCHEMA`'s types for the passed-through columns, so every block of a stage has one
schema, whatever nulls it holds. Nothing here needs torch (the image transforms still import it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fpc_ray.label.rows import PASSED_THROUGH, draw_cams, label_table, optional_column
from fpc_ray.label.schema import LABEL_SCHEMA

_INT_COLUMNS = ("frame", "width", "height")
# The passed-through columns' types: LABEL_SCHEMA's, or a string where the schema lacks the column.
_PASSED_FIELDS = [LABEL_SCHEMA.field(n) if n in LABEL_SCHEMA.names else pa.field(n, pa.string())
                  for n in PASSED_THROUGH]


def tensor_column(values: np.ndarray) -> pa.Array:
    """An N x ... array as one Arrow column of N fixed-shape tensors."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(values))


def passed_columns(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """The passed-through columns of a numpy batch as Python values (Ray Data turns a nullable
    integer column into floats with NaN)."""
    n = len(batch["source_uri"])
    return {f.name: optional_column(batch, f.name, n, int if f.name in _INT_COLUMNS else str)
            for f in _PASSED_FIELDS}


def frame_block(passed: dict[str, list], arrays: dict[str, pa.Array]) -> pa.Table:
    """A block of frame rows: the passed-through columns, typed, and ``arrays``."""
    columns = {f.name: pa.array(passed[f.name], f.type) for f in _PASSED_FIELDS}
    return pa.table({**columns, **arrays})


def decode_stage(batch: dict[str, np.ndarray], *, storage: dict | None, input_size: int, thumb_size: int,
                 frame_stride: int, keep_jpeg: bool, max_object_bytes: int, uid_key: str | None = None) -> pa.Table:
    """Listed objects -> their frame rows as fixed-size arrays: ``pixels`` (the letterboxed input),
    ``thumb`` (padded to ``thumb_size`` square; its size in ``thumb_h`` / ``thumb_w``), ``jpeg``
    (a frame left encoded for the predictor, whose pixels are zero until it decodes it) and the
    passed-through columns. Error rows have zero pixels and no thumbnail."""
    from fpc_ray.label.frames import ReadDecode

    reader = ReadDecode(storage, input_size, thumb_size, frame_stride, max_object_bytes, uid_key, keep_jpeg)
    uris = [str(u) for u in batch["uri"]]
    sizes = optional_column(batch, "size", len(uris), int)
    listing_errors = optional_column(batch, "listing_error", len(uris), str)
    rows = [row for args in zip(uris, sizes, listing_errors, strict=True) for row in reader.frames(*args)]
    pixels = np.zeros((len(rows), input_size, input_size), np.uint8)
    thumbs = np.zeros((len(rows), thumb_size, thumb_size), np.uint8)
    thumb_sizes = np.zeros((len(rows), 2), np.int32)
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            pixels[i] = row["pixels"]
            thumb_sizes[i] = row["thumb"].shape
            thumbs[i, :thumb_sizes[i, 0], :thumb_sizes[i, 1]] = row["thumb"]
    passed = {key: [row[key] for row in rows] for key in PASSED_THROUGH}
    return frame_block(passed, {"pixels": tensor_column(pixels), "thumb": tensor_column(thumbs),
                                "thumb_h": pa.array(thumb_sizes[:, 0]), "thumb_w": pa.array(thumb_sizes[:, 1]),
                                "jpeg": pa.array([row["jpeg"] for row in rows], pa.binary())})


def overlay_stage(batch: dict[str, np.ndarray], *, class_names: list[str], version: str, run_id: str,
                  input_size: int) -> pa.Table:
    """The GPU predictors' output -> LABEL_SCHEMA rows: CAM overlays on the thumbnails, PNG."""
    passed = passed_columns(batch)
    ok = [i for i, error in enumerate(passed["error"]) if error is None]
    pngs = None
    if "cam" in batch:
        thumbs, th, tw = batch["thumb"], batch["thumb_h"], batch["thumb_w"]
        rows = [{"thumb": thumbs[i, :th[i], :tw[i]], "width": passed["width"][i], "height": passed["height"][i]}
                for i in ok]
        pngs = draw_cams(None, [batch["cam"][i] for i in ok], rows, input_size)
    return label_table(passed, ok, np.asarray(batch["probs"])[ok], pngs, class_names, version, run_id)
