"""The labelling output schema: the one definition every writer and reader of runs uses."""

from __future__ import annotations

import json

import pyarrow as pa

LABEL_SCHEMA = pa.schema([
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("frame", pa.int32(), nullable=False),
    pa.field("study_uid", pa.string()),
    pa.field("series_uid", pa.string()),
    pa.field("sop_uid", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("content_sha256", pa.string()),
    pa.field("label", pa.string()),
    pa.field("label_index", pa.int16()),
    pa.field("confidence", pa.float32()),
    pa.field("top2_label", pa.string()),
    pa.field("top2_confidence", pa.float32()),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("gradcam_png", pa.binary()),
    pa.field("model_version", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("labelled_at", pa.timestamp("us", tz="UTC")),
    pa.field("error", pa.string()),
])

# Error kinds, the prefix of every `error` value ("kind: detail").
ERROR_KINDS = ("empty", "not_an_image", "truncated", "no_pixels", "too_large", "unsupported", "read_failed")


def schema_with_metadata(card: dict) -> pa.Schema:
    """LABEL_SCHEMA carrying the model card and class names as Parquet key-value metadata."""
    return LABEL_SCHEMA.with_metadata({
        "fpc_ray.model_card": json.dumps(card),
        "fpc_ray.class_names": json.dumps(card["class_names"]),
    })
