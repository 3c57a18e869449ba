"""The committed runs under a labelling output, oldest first, each with its ``stats``.

A run committed before ``stats`` existed has them computed from its Parquet here, and says so:
``source`` is ``computed``. A run whose stats were recorded with another low-confidence threshold
than the config's keeps them, but for the low-confidence share, which is counted again from the
run's ``confidence`` column alone (one float column: cheap beside the whole stats read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fpc_ray.errors import UserError
from fpc_ray.files import validated
from fpc_ray.label.run_stats import HISTOGRAM_BINS, STATS_VERSION, low_confidence_share, read_stats_table, run_stats
from fpc_ray.label.runs import SUCCESS, read_marker, reading_runs, run_folders, run_parts
from fpc_ray.storage import Location


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Histogram(_Strict):
    counts: Annotated[list[int], Field(min_length=HISTOGRAM_BINS, max_length=HISTOGRAM_BINS)]
    mean: float | None


class _LowConfidence(_Strict):
    threshold: float
    frames: int
    share: float | None


class RecordedStats(_Strict):
    """What drift and trends read of a marker's ``stats`` (version :data:`STATS_VERSION`)."""

    version: int
    rows: int
    labelled: int
    errors: int
    errors_by_kind: dict[str, int] = {}
    class_names: list[str] | None = None
    by_class: dict[str, int]
    confidence: _Histogram
    low_confidence: _LowConfidence
    input_kind: dict[str, int]


class _WithStats(_Strict):
    stats: RecordedStats


@dataclass
class RunRecord:
    """One committed run as drift and trends see it."""

    run_id: str
    committed_at: str | None
    model_version: str | None
    stats: dict
    source: str  # "recorded" (from _SUCCESS.json) or "computed" (from the run's Parquet)
    folder: Location


def _stats(summary: dict, run: Location, low_confidence: float) -> tuple[dict, str]:
    recorded = summary.get("stats")
    if not recorded or recorded.get("version") != STATS_VERSION:
        with reading_runs([run]):
            table = read_stats_table(run_parts(run), run.fs)
        return run_stats(table, low_confidence), "computed"
    validated({"stats": recorded}, _WithStats, run.join(SUCCESS).uri, "run marker")
    if recorded["low_confidence"]["threshold"] != low_confidence:
        with reading_runs([run]):
            table = read_stats_table(run_parts(run), run.fs, columns=("confidence",))
        recorded = recorded | {"low_confidence": low_confidence_share(table["confidence"], low_confidence)}
    return recorded, "recorded"


def _read_summary(run: Location) -> dict | None:
    """A run's ``_SUCCESS.json``, checked, or None when the run is not committed."""
    return read_marker(run) if run.join(SUCCESS).exists() else None


def load_history(output: Location, low_confidence: float) -> list[RunRecord]:
    """Every committed run under ``output`` in the order they were committed (``committed_at``,
    then the run id, which sorts by time for generated ids); runs from before ``committed_at``
    come first."""
    records = []
    for run_id, folder in run_folders(output).items():
        summary = _read_summary(folder)
        if summary is None:
            continue
        stats, source = _stats(summary, folder, low_confidence)
        records.append(RunRecord(run_id, summary.get("committed_at"), summary.get("model_version"), stats,
                                 source, folder))
    return sorted(records, key=lambda r: (r.committed_at or "", r.run_id))


def open_history(prefix: str, storage, low_confidence: float) -> list[RunRecord]:
    """:func:`load_history` of a prefix given by the user; a prefix without runs is a UserError."""
    from fpc_ray.storage import resolve

    output = resolve(prefix, storage)
    records = load_history(output, low_confidence)
    if not records:
        what = "no such prefix" if not output.exists() else f"no committed run (no run=<id>/{SUCCESS}) under it"
        raise UserError(f"{prefix}: {what}")
    return records
