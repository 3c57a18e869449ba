"""``fpc-ray review export``: write a review batch of the least certain frames of committed runs.

A batch under PREFIX::

    images/<frame_id>.png    the frame at full resolution, decoded again from its source object
    cams/<frame_id>.png      the run's GradCAM thumbnail of it
    tasks.json               Label Studio import tasks (the model's label as a pre-annotation)
    labeling_config.xml      the matching labelling config
    tasks.csv                the same frames as a spreadsheet, ``label`` left empty
    manifest.parquet         one row a frame: what ``review import`` validates answers against
    batch.json               how the batch was chosen (strategy, seed, runs, model versions)

``manifest.parquet`` and ``batch.json`` are written last: a folder without them is not a batch.
Frames in the manifest of any batch beside PREFIX (every ``<parent of PREFIX>/*/manifest.parquet``)
were exported before and are not chosen again, so keep a project's batches side by side under
one parent. Exports into one parent take turns: the parent's commit lock (the one labelling
takes on its output, :class:`fpc_ray.label.lock.CommitLock`) is held from the already-exported
check to the manifest write, so two exports started together never share a frame.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import cv2
import pyarrow as pa
import pyarrow.fs as pafs

from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError, printable
from fpc_ray.files import DamagedFile, read_parquet, write_atomic, write_parquet_atomic
from fpc_ray.label.decode import DecodeError, decode_object
from fpc_ray.label.lock import CommitLock
from fpc_ray.label.runs import reading_runs
from fpc_ray.review import Format, Strategy, labelstudio
from fpc_ray.review.select import input_runs, ranked, read_candidates
from fpc_ray.storage import Location, guard, is_remote, resolve

MANIFEST = "manifest.parquet"
BATCH = "batch.json"
TASKS_JSON = "tasks.json"
TASKS_CSV = "tasks.csv"
CONFIG_XML = "labeling_config.xml"
FORMATS = tuple(f.value for f in Format)
MANIFEST_SCHEMA = pa.schema([
    ("frame_id", pa.string()), ("source_uri", pa.string()), ("frame", pa.int32()),
    ("content_sha256", pa.string()), ("study_uid", pa.string()),
    ("study", pa.string()),  # the frame's study: its study UID, or its source's prefix without one
    ("label", pa.string()), ("confidence", pa.float32()), ("model_version", pa.string()),
    ("run_id", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
])
_ONLY_FRAME_0 = 1 << 30  # a frame stride that keeps frame 0 alone


@dataclass
class ExportOptions:
    n: int
    strategy: Strategy = Strategy.least_confident
    per_class: int | None = None
    seed: int = 0
    formats: tuple[str, ...] = FORMATS
    image_root: str | None = None  # the URL Label Studio reaches the batch at; see image_url


def study_of(row: dict) -> str:
    """A frame's study: its study UID, or for an object without one (PNG, JPEG) its prefix."""
    return row["study_uid"] or f"prefix:{posixpath.dirname(row['source_uri'])}"


def image_url(out: Location, frame_id: str, image_root: str | None) -> str:
    """The task's image: ``image_root/images/<id>.png`` where given (e.g. Label Studio's
    ``/data/local-files/?d=...`` for local files); else the batch's ``s3://`` URI (resolved by
    a Label Studio S3 source storage) or, locally, the path relative to the batch folder."""
    rel = f"images/{frame_id}.png"
    if image_root:
        return f"{image_root.rstrip('/')}/{rel}"
    return out.join("images", f"{frame_id}.png").uri if is_remote(out.uri) else rel


def read_manifest(loc: Location, columns: list[str] | None = None) -> pa.Table:
    """A batch's ``manifest.parquet`` (some ``columns`` of it), checked against MANIFEST_SCHEMA:
    a damaged one is one line naming it."""
    table = read_parquet(loc, "review manifest", columns)
    wanted = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    try:
        return table.select(wanted.names).cast(wanted)
    except (KeyError, pa.ArrowException) as e:
        raise DamagedFile(f"{loc.uri}: damaged review manifest: not its columns ({printable(str(e))[:200]})") from None


def batches_parent(out: Location) -> Location:
    """The folder whose batches are ``out``'s siblings: the one :func:`exported_frames` reads
    and the one whose commit lock an export holds."""
    return resolve(posixpath.dirname(out.uri) if is_remote(out.uri) else os.path.dirname(out.path),
                   filesystem=out.fs)


def exported_frames(out: Location) -> set[str]:
    """The frame ids in the manifests of the batches beside ``out`` (under its parent)."""
    parent = batches_parent(out)
    done: set[str] = set()
    for entry in parent.entries():
        manifest = parent.join(entry.base_name, MANIFEST)
        if entry.type == pafs.FileType.Directory and manifest.exists():
            done.update(read_manifest(manifest, columns=["frame_id"])["frame_id"].to_pylist())
    return done


def _read_source(uri: str, storage: StorageConfig | None) -> bytes | None:
    try:
        return resolve(uri, storage).read_bytes()
    except UserError:
        return None


def _frames_of(uri: str, data: bytes | None, content_sha256: str, rows: list[dict]) -> dict[int, object] | str:
    """The wanted frames of one source object as one run labelled it (index -> gray frame), or
    why they cannot be had: ``vanished``, ``changed`` (the object's content hash is no longer
    ``content_sha256``, the one the rows were labelled from) or ``undecodable``."""
    if data is None:
        return "vanished"
    if hashlib.sha256(data).hexdigest() != content_sha256:
        return "changed"
    wanted = {r["frame"] for r in rows}
    stride = math.gcd(*wanted) or _ONLY_FRAME_0  # every wanted index is a multiple of it
    try:
        decoded = decode_object(uri, data, frame_stride=stride)
    except DecodeError:
        return "undecodable"
    frames = {i: gray for i, gray in decoded.frames if i in wanted}
    return frames if len(frames) == len(wanted) else "undecodable"


def _next_rows(order: Iterator[dict], need: int, cap: int | None, per_class: Counter) -> list[dict]:
    rows = []
    for row in order:
        if cap is not None and per_class[row["label"]] >= cap:
            continue
        per_class[row["label"]] += 1
        rows.append(row)
        if len(rows) == need:
            break
    return rows


def write_frames(order: Iterator[dict], cap: int | None, n: int, out: Location,
                 storage: StorageConfig | None, between: Callable[[], None] = lambda: None,
                 ) -> tuple[list[dict], Counter]:
    """Decode and write up to ``n`` frames in ``order`` (a class at most ``cap`` times); a frame
    whose source vanished, changed or no longer decodes is skipped, counted, and replaced by
    the next in order. ``between`` runs before each round of reads (the lock's renewal).
    Returns the rows written (with width and height) and the skips by reason."""
    chosen, skipped, per_class = [], Counter(), Counter()
    while len(chosen) < n:
        between()
        batch = _next_rows(order, n - len(chosen), cap, per_class)
        if not batch:
            break
        # Rows of one object from runs before and after it was replaced name different content:
        # each content is checked (and decoded) on its own, and each object is read once.
        by_content: dict[tuple[str, str], list[dict]] = {}
        for row in batch:
            by_content.setdefault((row["source_uri"], row["content_sha256"]), []).append(row)
        data = {uri: _read_source(uri, storage) for uri, _ in by_content}
        frames = {key: _frames_of(key[0], data[key[0]], key[1], rows) for key, rows in by_content.items()}
        for row in batch:  # in the batch's order
            got = frames[(row["source_uri"], row["content_sha256"])]
            if isinstance(got, str):
                skipped[got] += 1
                per_class[row["label"]] -= 1
                continue
            gray = got[row["frame"]]
            _, png = cv2.imencode(".png", gray)
            out.join("images", f"{row['frame_id']}.png").write_bytes(png.tobytes())
            chosen.append({**row, "height": gray.shape[0], "width": gray.shape[1]})
    return chosen, skipped


def write_cams(chosen: list[dict], out: Location, storage: StorageConfig | None) -> int:
    """Copy each chosen frame's CAM thumbnail from its run, reading that column for these
    objects only. Returns how many were written (a row may have none)."""
    import pyarrow.dataset as pads

    from fpc_ray.label.runs import run_parts

    written = 0
    by_run: dict[str, list[dict]] = {}
    for row in chosen:
        by_run.setdefault(row["run_uri"], []).append(row)
    for run_uri, rows in by_run.items():
        run = resolve(run_uri, storage)
        uris = sorted({r["source_uri"] for r in rows})
        table = guard(run.uri, lambda run=run, uris=uris: pads.dataset(
            run_parts(run), filesystem=run.fs, format="parquet").to_table(
            columns=["source_uri", "frame", "content_sha256", "gradcam_png"],
            filter=pads.field("source_uri").isin(uris)))
        cams = {(s, f): png for s, f, png in zip(*(table[c].to_pylist() for c in (
            "content_sha256", "frame", "gradcam_png")), strict=True)}
        for row in rows:
            png = cams.get((row["content_sha256"], row["frame"]))
            if png:
                out.join("cams", f"{row['frame_id']}.png").write_bytes(png)
                written += 1
    return written


def _write_outputs(chosen: list[dict], out: Location, opts: ExportOptions, runs: list[str]) -> None:
    if Format.label_studio in opts.formats:
        tasks = [labelstudio.task(r, image_url(out, r["frame_id"], opts.image_root)) for r in chosen]
        write_atomic(out.join(TASKS_JSON), json.dumps(tasks, indent=1).encode())
        out.join(CONFIG_XML).write_text(labelstudio.labeling_config())
    if Format.csv in opts.formats:
        out.join(TASKS_CSV).write_text(labelstudio.tasks_csv(chosen))
    manifest = pa.Table.from_pylist([{**{k: r.get(k) for k in MANIFEST_SCHEMA.names}, "study": study_of(r)}
                                     for r in chosen], schema=MANIFEST_SCHEMA)
    write_parquet_atomic(out.join(MANIFEST), manifest)  # never half a manifest: later exports read it
    write_atomic(out.join(BATCH), json.dumps({
        "created_at": dt.datetime.now(dt.UTC).isoformat(), "frames": len(chosen),
        "options": {**asdict(opts), "strategy": str(opts.strategy), "formats": list(opts.formats)},
        "runs": runs, "model_versions": sorted({r["model_version"] for r in chosen}),
    }, indent=2).encode())


def _refuse_a_batch(out: Location) -> None:
    if out.join(MANIFEST).exists():
        raise UserError(f"{out.uri}: already holds a review batch; give a new --output")


def export_batch(inputs: list[str], output: str, opts: ExportOptions, storage: StorageConfig | None = None,
                 echo: Callable[[str], None] = print) -> dict:
    """Choose frames from the committed runs ``inputs`` names and write a review batch at ``output``.

    Raises:
        UserError: ``output`` already holds a batch, an input holds no committed run, or no
            frame is left to export.
        RunFailed: another export into the same parent held its lock too long, or (on S3) took
            over this export's expired lease.
    """
    if opts.per_class is not None and opts.strategy != Strategy.per_class:
        raise UserError(f"--per-class applies to --strategy {Strategy.per_class} only, not {opts.strategy}")
    out = resolve(output, storage)
    if is_remote(out.uri) and "/" not in out.path:
        raise UserError(f"--output {out.uri}: give a prefix inside the bucket (batches sit side by side under one)")
    _refuse_a_batch(out)  # early, before reading runs; checked again under the lock, where it counts
    runs = {r.uri: r for uri in inputs for r in input_runs(uri, storage)}
    with reading_runs(list(runs.values())):  # a damaged run part: one line naming it
        candidates = read_candidates(list(runs.values())).to_pylist()
    # Sibling exports take turns from the already-exported check to the manifest write: the frames
    # one chooses are in its manifest before the next reads the manifests.
    with CommitLock(batches_parent(out), f"review export to {out.uri}", storage) as lock:
        _refuse_a_batch(out)
        done = exported_frames(out)
        rows = [r for r in candidates if r["frame_id"] not in done]
        order, cap = ranked(rows, opts.strategy, opts.n, opts.per_class, opts.seed)
        chosen, skipped = write_frames(order, cap, opts.n, out, storage, between=lock.renew)
        if not chosen:
            raise UserError(f"no frame left to export from {len(runs)} run(s): {len(candidates)} labelled frame(s), "
                            f"{len(candidates) - len(rows)} exported in earlier batches, {sum(skipped.values())} "
                            f"whose source vanished or changed")
        lock.renew()
        with reading_runs(list(runs.values())):
            cams = write_cams(chosen, out, storage)
        lock.renew(force=True)  # the lease is still ours, and fresh for the manifest write
        _write_outputs(chosen, out, opts, sorted(runs))
    if skipped:
        echo(f"warning: skipped {sum(skipped.values())} frame(s) whose source is no longer what the run "
             f"labelled: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}")
    return {"batch": out.uri, "frames": len(chosen), "cams": cams, "runs": len(runs),
            "already_exported": len(candidates) - len(rows), "skipped": dict(skipped),
            "by_class": dict(Counter(r["label"] for r in chosen))}
