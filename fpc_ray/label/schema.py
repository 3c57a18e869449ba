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
    pa.field("input_kind", pa.string()),  # one of INPUT_KINDS; null for error rows and runs before it
])

# What a labelled frame was read from: the input-kind mix of a run shows a site that starts
# exporting cine loops or JPEGs. Runs committed before the column existed read it as null.
INPUT_KINDS = ("png", "jpeg", "dicom", "dicom_cine")

# Error kinds, the prefix of every `error` value ("kind: detail"); each names one thing about one
# object, never the infrastructure (an outage fails the run instead of becoming rows).
ERROR_KINDS = (
    "empty",         # a zero-byte object
    "not_an_image",  # not a PNG, JPEG or DICOM file (TIFF, GIF, text...)
    "truncated",     # a known format whose data stops early or does not decode
    "no_pixels",     # DICOM without pixel data or without its image attributes
    "too_large",     # over the byte cap or the pixel limit, by the listing, header or codestream
    "unsupported",   # a DICOM transfer syntax no installed decoder handles (MPEG video...)
    "malformed",     # anything else unexpected while decoding, letterboxing or drawing its CAM
    "vanished",      # listed, then gone before it was read
    "unreadable",    # the storage refused this object (permission, archived storage class)
    "bad_name",      # the listing could not represent its name (a local name that is not UTF-8)
)
MAX_ERROR_DETAIL = 200  # an error value stays one short line in reports and logs


def error_text(kind: str, detail: str) -> str:
    """The ``error`` value for an object: ``"kind: detail"``, one line, at most a few hundred chars.

    Raises:
        ValueError: ``kind`` is not in ERROR_KINDS (a bug: every kind is declared here).
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    detail = " ".join(str(detail).split())
    if len(detail) > MAX_ERROR_DETAIL:
        detail = detail[:MAX_ERROR_DETAIL - 3] + "..."
    return f"{kind}: {detail}"


def error_kind(error: str) -> str:
    """The kind of an ``error`` value: ``"kind: detail"`` -> ``"kind"`` (what :func:`error_text`
    wrote; a value without a colon is all kind)."""
    return error.split(":", 1)[0]


def schema_with_metadata(card: dict) -> pa.Schema:
    """LABEL_SCHEMA carrying the model card and class names as Parquet key-value metadata."""
    return LABEL_SCHEMA.with_metadata({
        "fpc_ray.model_card": json.dumps(card),
        "fpc_ray.class_names": json.dumps(card["class_names"]),
    })
