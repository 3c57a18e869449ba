"""What a committed labelling run is, and how an attempt becomes one.

Layout under OUTPUT::

    run=<run_id>/part-*.parquet     the rows (LABEL_SCHEMA, model card in the metadata)
    run=<run_id>/_objects.parquet   the objects this run accounted for (uri, size, mtime_ns)
    run=<run_id>/_SUCCESS.json      created last, only if absent: a run without it is not committed;
                                    its ``stats`` (:mod:`fpc_ray.label.run_stats`) feed drift and trends
    _index.parquet                  (uri, size, mtime_ns, run) of committed runs, the runs covered
                                    in its metadata; rewritten at every commit
    _commit.lock                    serialises commits (see :mod:`fpc_ray.label.lock`)
    _staging/run=<id>/attempt=<aid>/  where one attempt writes before it commits

Every attempt stages in a folder of its own and nothing deletes another attempt's files, except
:func:`clean_stale_staging` (attempts older than a grace period). :func:`commit` runs under the
commit lock: it refuses when the run id was committed meanwhile, drops rows of objects that
runs committed while it worked already hold, moves its parts, writes ``_objects.parquet``,
creates the marker and rewrites the index. A run cut short anywhere before the marker left
nothing that counts; one cut short between the marker and the index is found by the next
reader, which lists ``run=*`` folders the index does not cover.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from fpc_ray.config import DriftConfig, StorageConfig
from fpc_ray.errors import ConcurrentChange, UserError, shorten
from fpc_ray.files import (
    DamagedFile,
    damaged_parquet,
    parquet_damage,
    parse_json,
    read_json,
    read_parquet,
    temporary_name,
    write_parquet_atomic,
)
from fpc_ray.label.lock import CommitLock
from fpc_ray.label.run_stats import read_stats_table, run_stats
from fpc_ray.label.schema import error_kind
from fpc_ray.storage import Location, guard, is_remote

SUCCESS = "_SUCCESS.json"
OBJECTS = "_objects.parquet"
STAGING = "_staging"
INDEX = "_index.parquet"
OBJECTS_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])
INDEX_SCHEMA = OBJECTS_SCHEMA.append(pa.field("run", pa.string()))
INDEX_RUNS_KEY = b"fpc_ray.runs"  # JSON list of the run ids the index covers
STALE_AFTER_S = 24 * 3600.0
_STAMP = "%Y%m%dT%H%M%SZ"

Key = tuple[str, int, int]  # (uri, size, mtime_ns): an object as listed


class _Counts(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    listed: int
    skipped: int
    labelled: int


class RunMarker(BaseModel):
    """What every reader of a ``_SUCCESS.json`` relies on, typed: a marker with another type in
    one of these fields is damaged. Everything fpc-ray writes there has ``run_id``."""

    model_config = ConfigDict(extra="allow", strict=True)

    run_id: str
    attempt: str | None = None
    model_version: str | None = None
    committed_at: str | None = None
    stats: dict | None = None  # its fields are drift's to check (:mod:`fpc_ray.drift.history`)


class CommittedRun(RunMarker):
    """A marker as the labeller writes it, with the counts a run's page shows."""

    model_version: str
    model_uri: str
    input: str | None = None
    inputs: list[str] | None = None  # runs before `inputs` have `input` only
    objects: _Counts
    rows: int
    labelled: int
    errors: int
    timings: dict[str, float | None] = {}
    options: dict = {}

    @model_validator(mode="after")
    def _an_input(self):
        if self.input is None and not self.inputs:
            raise ValueError("neither input nor inputs")
        return self


def read_marker(run: Location, model: type[RunMarker] = RunMarker) -> dict:
    """A committed run's ``_SUCCESS.json``, bounded, strictly parsed and checked against ``model``.

    Raises:
        UserError: the marker is missing, or damaged (one line naming it and what is wrong).
    """
    return read_json(run.join(SUCCESS), "run marker", model).model_dump()


def new_attempt_id(now: dt.datetime | None = None) -> str:
    """``<UTC %Y%m%dT%H%M%SZ>-<6 hex>``: sortable, dated (for stale clean-up) and unique."""
    return f"{(now or dt.datetime.now(dt.UTC)):{_STAMP}}-{secrets.token_hex(3)}"


def attempt_started(attempt_id: str) -> dt.datetime | None:
    """When an attempt started, from its id; None for an id not made by :func:`new_attempt_id`."""
    try:
        return dt.datetime.strptime(attempt_id.split("-", 1)[0], _STAMP).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def parquet_parts(folder: Location, prefix: str = "") -> list[str]:
    """The Parquet files under a run's staging or committed folder (names starting with
    ``prefix``: ``part-`` leaves out a committed run's ``_objects.parquet``), in a stable order."""
    return sorted(f.path for f in folder.entries(recursive=True) if f.type == pafs.FileType.File
                  and f.base_name.startswith(prefix) and f.base_name.endswith(".parquet"))


def run_parts(run: Location) -> list[str]:
    """The row files of a committed run folder (``OUTPUT/run=<id>/``), paths in ``run.fs``."""
    return parquet_parts(run, "part-")


def run_folders(output: Location) -> dict[str, Location]:
    """Every ``run=<id>/`` folder under OUTPUT, committed or not: one listing of OUTPUT's top level."""
    if not is_remote(output.uri) and not os.path.isdir(output.path):
        return {}
    return {_name(e.path)[4:]: output.join(_name(e.path)) for e in output.entries()
            if e.type == pafs.FileType.Directory and _name(e.path).startswith("run=")}


def free_run_id(output: Location, base: str, most: int = 99) -> str:
    """``base``, else ``base-02``, ``base-03``, ...: the first id no run folder (committed or cut
    short) nor staging under OUTPUT uses. Default ids are UTC seconds, and a run with nothing to
    do finishes within one; two digits keep the ids in the order they were taken.

    Raises:
        UserError: all ``most`` ids of that second are taken.
    """
    taken = set(run_folders(output)) | set(run_folders(output.join(STAGING)))
    for n in range(1, most + 1):
        run_id = base if n == 1 else f"{base}-{n:02d}"
        if run_id not in taken:
            return run_id
    raise UserError(f"run ids {base} to {base}-{most:02d} are all taken under {output.uri}; give --run-id")


# Run ids name folders (``run=<id>/``) and S3 keys, and are drawn as text in the trends page's
# plots: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (never ``.``
# or ``..``). Default ids (UTC seconds, ``-02`` suffixes), nightly ids and review batch names fit.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str, what: str = "--run-id") -> str:
    """``run_id``, refused in one line naming ``what`` unless it matches :data:`RUN_ID`.

    Raises:
        UserError: an empty id, one over 128 characters, or one with another character.
    """
    if not RUN_ID.fullmatch(run_id):
        raise UserError(f"{what} {shorten(run_id, 80)!r}: use 1 to 128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (it names a folder and S3 keys)")
    return run_id


def committed_runs(output: Location) -> list[Location]:
    """Run folders under OUTPUT that hold a ``_SUCCESS.json`` (one request per folder: for
    whole-history questions use :func:`committed_objects`, which reads the index)."""
    return [run for run in run_folders(output).values() if run.join(SUCCESS).exists()]


def read_index(output: Location, echo: Callable[[str], None] = print) -> tuple[pa.Table, set[str]]:
    """The index's rows and the run ids it covers (empty for an output without one).

    The index is a cache over the committed runs' object lists: one it cannot read (damaged,
    cut short, not Parquet) is said in one line and read as absent, so the runs themselves are
    read and the next commit rewrites it; one damaged file never stops labelling.
    """
    loc = output.join(INDEX)
    if not loc.exists():
        return INDEX_SCHEMA.empty_table(), set()
    try:
        table = read_parquet(loc, "index")
        runs = parse_json((table.schema.metadata or {}).get(INDEX_RUNS_KEY, b"[]"), loc.uri, "index")
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
            raise DamagedFile(f"{loc.uri}: damaged index: its run list is not a list of run ids")
        return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA), set(runs)
    except (DamagedFile, pa.ArrowException, KeyError) as e:  # damage, not storage: that is raised
        echo(f"warning: {loc.uri} is not a readable index ({type(e).__name__}); reading the committed runs "
             "instead, and the next commit rewrites it")
        return INDEX_SCHEMA.empty_table(), set()


def _kind(name: str) -> str:
    """What a committed run's Parquet file is, for messages."""
    return "object list" if name == OBJECTS else "run part"


def _first_damaged(runs: list[Location]) -> tuple[str, str] | None:
    """(URI, why) of the first Parquet file of ``runs`` that cannot be read, footer first, then
    whole (a page damaged inside leaves the footer readable); None when all read."""
    for read in (pq.read_metadata, pq.read_table):
        for run in runs:
            for path in parquet_parts(run):
                try:
                    read(path, filesystem=run.fs)
                except (pa.ArrowException, OSError) as e:
                    why = parquet_damage(e)
                    if why is not None:
                        name = path[len(run.path):].lstrip("/")
                        return run.join(name).uri, f"damaged {_kind(name)}: {why}"
    return None


@contextlib.contextmanager
def reading_runs(runs: list[Location]):
    """Reads of committed runs' Parquet files (parts, ``_objects.parquet``): a damaged one (cut
    short, overwritten, not Parquet, damaged inside) is one line naming it, not Arrow's
    traceback; a storage error is sorted as :func:`guard` sorts it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        where = ", ".join(r.uri for r in runs)
        if parquet_damage(e) is None:
            raise damaged_parquet(where, "run", e) from None
        damaged = _first_damaged(runs)
        if damaged is None:
            raise DamagedFile(f"cannot read the rows of {where}: {parquet_damage(e)}") from None
        raise DamagedFile(f"{damaged[0]}: {damaged[1]}; restore it, or delete its run folder to label those "
                          "objects again") from None


def _run_objects(run_id: str, run: Location) -> pa.Table:
    table = read_parquet(run.join(OBJECTS), _kind(OBJECTS), columns=OBJECTS_SCHEMA.names)
    return table.cast(OBJECTS_SCHEMA).append_column("run", pa.array([run_id] * table.num_rows, pa.string()))


def committed_objects(output: Location, echo: Callable[[str], None] = print) -> tuple[pa.Table, set[str]]:
    """(uri, size, mtime_ns, run) of every committed run, and the committed run ids.

    Reads the index, plus the object lists of committed runs it does not cover (outputs written
    before the index existed, or a commit cut short between its marker and the index), found
    with one listing of OUTPUT's ``run=*`` folders. Index rows of a run whose folder is gone (a
    user deleted it to relabel) no longer count.
    """
    folders = run_folders(output)
    index, covered = read_index(output, echo)
    covered &= set(folders)
    if index.num_rows:
        index = index.filter(pc.is_in(index["run"], pa.array(sorted(covered), pa.string())))
    uncovered = [rid for rid, run in sorted(folders.items()) if rid not in covered and run.join(SUCCESS).exists()]
    extra = [_run_objects(rid, folders[rid]) for rid in uncovered]
    runs = covered | set(uncovered)
    return pa.concat_tables([index, *extra]) if extra else index, runs


def already_labelled(output: Location) -> set[Key]:
    """(uri, size, mtime_ns) of every object in a committed run."""
    table, _ = committed_objects(output)
    return object_keys(table)


def object_keys(table: pa.Table) -> set[Key]:
    """The (uri, size, mtime_ns) identities of an objects (or index) table's rows."""
    return set(zip(*(table[c].to_pylist() for c in OBJECTS_SCHEMA.names), strict=True))


def objects_not_in(objects: list[dict], keys: set[Key]) -> list[dict]:
    """The listed objects (dicts with uri, size, mtime_ns) whose identity is not among ``keys``."""
    return [o for o in objects if (o["uri"], o["size"], o["mtime_ns"]) not in keys]


def write_index(output: Location, table: pa.Table, runs: set[str]) -> None:
    """Replace the index atomically: a local temp file renamed over it, or one S3 PUT."""
    table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    table = table.replace_schema_metadata({INDEX_RUNS_KEY: json.dumps(sorted(runs)).encode()})
    write_parquet_atomic(output.join(INDEX), table)


def _age_s(folder: Location, now: float) -> float:
    """Seconds since anything under ``folder`` (a file or a folder) was last written."""
    info = folder.info()
    if info.type == pafs.FileType.File:
        return now - (info.mtime_ns or 0) / 1e9
    mtimes = [f.mtime_ns for f in folder.entries(recursive=True) if f.type == pafs.FileType.File and f.mtime_ns]
    return now - max(mtimes) / 1e9 if mtimes else float("inf")


def clean_stale_staging(output: Location, grace_s: float = STALE_AFTER_S, echo: Callable[[str], None] = print,
                        now: float | None = None) -> list[str]:
    """Delete staging attempts older than ``grace_s`` (crashed runs of any run id); one line.

    An attempt is stale when it started (its id) and last wrote a file more than ``grace_s``
    ago, so a run that labels for longer than the grace period keeps its staging; staging
    written before attempt folders existed (files directly under ``_staging/run=<id>/``) is aged
    by its files' modification times.

    Returns:
        What was deleted, relative to ``_staging/``.
    """
    now = time.time() if now is None else now
    staging = output.join(STAGING)
    deleted = []
    for run in staging.entries():
        if run.type != pafs.FileType.Directory:
            continue
        run_loc = staging.join(_name(run.path))
        for entry in run_loc.entries():
            name = _name(entry.path)
            loc = run_loc.join(name)
            started = attempt_started(name[len("attempt="):]) if name.startswith("attempt=") else None
            if started and now - started.timestamp() <= grace_s:
                continue
            if _age_s(loc, now) <= grace_s:  # started long ago but still writing: a long run, not a dead one
                continue
            try:
                if entry.type == pafs.FileType.Directory:
                    guard(loc.uri, lambda loc=loc: loc.fs.delete_dir(loc.path))
                else:
                    loc.delete()
            except UserError:  # another run's clean-up got there first
                continue
            deleted.append(f"{_name(run.path)}/{name}")
        if not is_remote(run_loc.uri):
            with contextlib.suppress(OSError):  # not empty: a live attempt; gone: cleaned by another run
                os.rmdir(run_loc.path)
    if deleted:
        echo(f"cleaned {len(deleted)} stale staging folder(s) older than {grace_s / 3600:g} h under "
             f"{staging.uri}: {', '.join(deleted[:5])}{' ...' if len(deleted) > 5 else ''}")
    return deleted


def summarise_rows(parts: list[str], fs: pafs.FileSystem) -> tuple[int, int, Counter, Counter]:
    """(rows, labelled rows, rows by class, errors by kind) of some LABEL_SCHEMA parts."""
    import pyarrow.dataset as pads

    if not parts:
        return 0, 0, Counter(), Counter()
    table = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["label", "error"])
    errors = Counter(error_kind(e) for e in table["error"].to_pylist() if e)
    labels = Counter(v for v in table["label"].to_pylist() if v)
    return table.num_rows, sum(labels.values()), labels, errors


@dataclass
class Attempt:
    """One try at committing run ``run_id`` under ``output``, staging in a folder of its own.

    ``baseline`` holds the runs already committed when the attempt started: at commit, runs
    committed since then are the ones whose objects it must not claim again.
    """

    output: Location
    run_id: str
    attempt_id: str = field(default_factory=new_attempt_id)
    baseline: set[str] = field(default_factory=set)

    @property
    def run_dir(self) -> Location:
        return self.output.join(f"run={self.run_id}")

    @property
    def staged(self) -> Location:
        return self.output.join(STAGING, f"run={self.run_id}", f"attempt={self.attempt_id}")

    def discard(self) -> None:
        """Delete this attempt's staging (never anyone else's)."""
        try:
            if self.staged.exists():
                self.staged.fs.delete_dir(self.staged.path)
        except Exception:  # noqa: BLE001 - left over, it is cleaned as stale later
            pass


def _marker_holder(run_dir: Location) -> str:
    try:
        return read_json(run_dir.join(SUCCESS), "run marker").get("attempt") or "an earlier attempt"
    except Exception:  # noqa: BLE001 - only for the message
        return "another attempt"


def _drop_late(attempt: Attempt, objects: list[dict], index: pa.Table, echo: Callable[[str], None]) -> list[dict]:
    """The objects no run committed since the attempt started holds; the others' rows are dropped."""
    since = index.filter(pc.invert(pc.is_in(index["run"], pa.array(sorted(attempt.baseline), pa.string()))))
    keep = objects_not_in(objects, object_keys(since))
    if len(keep) < len(objects):
        _drop_committed(attempt.staged, {o["uri"] for o in objects} - {o["uri"] for o in keep})
        echo(f"run {attempt.run_id}: dropped the rows of {len(objects) - len(keep)} object(s) that runs "
             "committed while this one worked already hold")
    return keep


def _move_parts(attempt: Attempt, lock: CommitLock) -> None:
    """The staged parts into ``run=<id>/``, after clearing a cut-short commit's leftovers there.

    Every destructive step proves the S3 lease is still ours first (a stalled call can outlast
    it); part names carry the attempt, so a stale holder never overwrites a winner's.
    """
    run_dir, staged = attempt.run_dir, attempt.staged
    lock.renew(force=True)
    if run_dir.exists():  # a cut-short commit's leftovers: no marker, and we hold the lock
        guard(run_dir.uri, lambda: run_dir.fs.delete_dir_contents(run_dir.path))
    run_dir.makedirs()
    for i, path in enumerate(parquet_parts(staged)):
        lock.renew(force=True)
        target = run_dir.join(f"part-{attempt.attempt_id}-{i:05d}.parquet").path
        guard(run_dir.uri, lambda path=path, target=target: staged.fs.move(path, target))


def _timings(summary: dict, commit_started: float, run_started: float | None) -> dict:
    timings = {**summary.get("timings", {}), "commit_s": round(time.perf_counter() - commit_started, 3)}
    if run_started is not None:
        timings["total_s"] = round(time.perf_counter() - run_started, 3)
    return timings


def _accounted_uris(staged: Location) -> set[str]:
    """The objects the staged rows account for: any row but a ``vanished`` one."""
    parts = parquet_parts(staged)
    if not parts:
        return set()
    import pyarrow.dataset as pads

    table = guard(staged.uri, lambda: pads.dataset(parts, filesystem=staged.fs, format="parquet").to_table(
        columns=["source_uri", "error"]))
    gone = pc.fill_null(pc.starts_with(table["error"], "vanished:"), False)
    return set(table.filter(pc.invert(gone))["source_uri"].to_pylist())


def _drop_committed(staged: Location, uris: set[str]) -> None:
    """Rewrite (or delete) only the staged parts that hold rows of ``uris``."""
    for path in parquet_parts(staged):
        table = guard(staged.uri, lambda path=path: pq.read_table(path, filesystem=staged.fs))
        drop = pc.is_in(table["source_uri"], pa.array(sorted(uris), pa.string()))
        if not pc.any(drop).as_py():
            continue
        kept = table.filter(pc.invert(drop))
        if kept.num_rows:
            guard(staged.uri, lambda path=path, kept=kept: pq.write_table(kept, path, filesystem=staged.fs))
        else:
            guard(staged.uri, lambda path=path: staged.fs.delete_file(path))


def _create_marker(run_dir: Location, body: bytes, storage: StorageConfig | None) -> None:
    """Create ``_SUCCESS.json`` only if absent, all or nothing: a torn marker never counts."""
    marker = run_dir.join(SUCCESS)
    if is_remote(marker.uri):
        from fpc_ray.conditional import PreconditionFailed, put_if_absent

        try:
            put_if_absent(marker, body, storage)
        except PreconditionFailed:
            raise ConcurrentChange(f"run {run_dir.uri} was committed by {_marker_holder(run_dir)} during this "
                                   "commit; this attempt's parts are left unmarked") from None
        return
    tmp = temporary_name(marker.path)
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, marker.path)  # atomic and exclusive: fails if the marker exists
    except FileExistsError:
        raise ConcurrentChange(f"run {run_dir.uri} was committed by {_marker_holder(run_dir)} during this "
                               "commit") from None
    finally:
        os.unlink(tmp)


def _forget_relabelled_run(output: Location, run_id: str, index: pa.Table,
                           runs: set[str]) -> tuple[pa.Table, set[str]]:
    """The index without ``run_id`` where it still names it (its folder was deleted to relabel
    it), rewritten before the folder fills again: else a commit cut short would count."""
    if run_id not in read_index(output, echo=lambda _: None)[1]:  # a damaged index was said already
        return index, runs
    index, runs = index.filter(pc.not_equal(index["run"], run_id)), runs - {run_id}
    write_index(output, index, runs)
    return index, runs


def _committed_summary(summary: dict, attempt: Attempt, counts: dict, timings: dict) -> dict:
    """The summary with what the moved parts hold: rows, labels, errors by kind, classes, and
    the ``stats`` that trends and drift compare run to run (one read of the small columns)."""
    run_dir = attempt.run_dir
    table = guard(run_dir.uri, lambda: read_stats_table(run_parts(run_dir), run_dir.fs))
    stats = run_stats(table, DriftConfig().low_confidence)
    by_class = {name: n for name, n in stats["by_class"].items() if n}
    return {**summary, "run_id": attempt.run_id, "attempt": attempt.attempt_id,
            "objects": {**summary["objects"], **counts},
            "rows": stats["rows"], "labelled": stats["labelled"], "errors": stats["errors"],
            "errors_by_kind": stats["errors_by_kind"], "by_class": by_class, "stats": stats,
            "timings": timings, "committed_at": dt.datetime.now(dt.UTC).isoformat()}


def commit(attempt: Attempt, objects: list[dict], summary: dict, storage: StorageConfig | None = None,
           echo: Callable[[str], None] = print, lock_wait_s: float | None = None,
           started: float | None = None) -> dict:
    """Commit an attempt's staged rows as run ``attempt.run_id``, exclusively.

    Args:
        attempt: the attempt, its rows staged in ``attempt.staged``.
        objects: the objects it labelled (``uri``, ``size``, ``mtime_ns``).
        summary: the run summary so far; counts of what is committed are filled in here.
        lock_wait_s: how long to wait for another commit on the same output.
        started: ``time.perf_counter()`` at the run's start, for the summary's ``total_s``.

    Returns:
        The summary as written to ``_SUCCESS.json``.

    Raises:
        ConcurrentChange: the run id was committed by another attempt meanwhile (a RunFailed).
        RunFailed: the lock could not be taken, or storage failed (a
            :class:`~fpc_ray.errors.StorageUnavailable`).
    """
    t0 = time.perf_counter()
    output, run_dir, staged = attempt.output, attempt.run_dir, attempt.staged
    lock_args = {} if lock_wait_s is None else {"wait_s": lock_wait_s}
    with CommitLock(output, attempt.attempt_id, storage, **lock_args) as lock:
        if run_dir.join(SUCCESS).exists():  # another attempt at this run id won
            other = _marker_holder(run_dir)
            attempt.discard()
            raise ConcurrentChange(f"run {attempt.run_id} was committed under {output.uri} by attempt {other} "
                                   f"while attempt {attempt.attempt_id} worked; this attempt's rows are discarded")
        # A damaged index was said when the run listed; read as absent here too, rewritten below.
        index, runs = committed_objects(output, echo=lambda _: None)
        keep = _drop_late(attempt, objects, index, echo)

        # Only objects whose rows are staged, and not `vanished`, count as labelled: an object
        # whose rows were lost (staging cleaned under a very long run) or that was gone when read
        # (a replica lagging) is left to a later run's listing instead of being skipped forever.
        accounted = _accounted_uris(staged)
        mine_objects = [o for o in keep if o["uri"] in accounted]
        index, runs = _forget_relabelled_run(output, attempt.run_id, index, runs)

        _move_parts(attempt, lock)
        mine = pa.Table.from_pylist([{k: o[k] for k in OBJECTS_SCHEMA.names} for o in mine_objects],
                                    schema=OBJECTS_SCHEMA)
        guard(run_dir.uri, lambda: pq.write_table(mine, run_dir.join(OBJECTS).path, filesystem=run_dir.fs))

        counts = {"labelled": len(mine_objects), "skipped": summary["objects"]["listed"] - len(keep),
                  "dropped_late": len(objects) - len(keep), "left_for_later": len(keep) - len(mine_objects)}
        summary = _committed_summary(summary, attempt, counts, _timings(summary, t0, started))
        lock.renew(force=True)  # on S3: the lease is still ours right before the marker
        _create_marker(run_dir, json.dumps(summary, indent=2).encode(), storage)

        write_index(output, pa.concat_tables([index, mine.append_column(
            "run", pa.array([attempt.run_id] * mine.num_rows, pa.string()))]), runs | {attempt.run_id})
    attempt.discard()
    return summary
