"""``fpc-ray label``: list -> read + decode -> predict + CAM -> Parquet, committed exclusively.

This module builds the Ray Data graph and runs it; what a run reads is listed by
:mod:`fpc_ray.label.listing`, how its actors are sized is :mod:`fpc_ray.label.resources`, and what
a committed run is (layout, staging attempts, the commit lock, the index) lives in
:mod:`fpc_ray.label.runs`. A run that dies leaves
only its own staging behind; the next run labels whatever is not in a committed run, so nothing
is duplicated and nothing lost, also when two runs work on one output at once.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from fpc_ray.bundle import check_bundle, follow_pointer
from fpc_ray.config import StorageConfig
from fpc_ray.errors import RunFailed, UserError, failure_line, ray_failure
from fpc_ray.label.listing import list_inputs
from fpc_ray.label.progress import StagedRowsWatcher, configure_ray_data
from fpc_ray.label.resources import OVERLAY_CPUS, WRITE_CPUS, size_predictors, size_split
from fpc_ray.label.runs import (
    OBJECTS_SCHEMA,
    SUCCESS,
    Attempt,
    check_run_id,
    clean_stale_staging,
    commit,
    committed_objects,
    free_run_id,
    object_keys,
    objects_not_in,
    parquet_parts,
    summarise_rows,
)
from fpc_ray.label.schema import schema_with_metadata
from fpc_ray.storage import Location, is_remote, resolve

BATCHES_PER_BLOCK = 4  # batches per Ray Data block (see _object_blocks)
PREDICTOR_QUEUE = 4  # batches queued at each split-design predictor (Ray Data's default: 2)
OVERLAY_BATCH = 256  # frames per overlay task call in the split design
# What travels to the predictors: the listing, plus why an object cannot be read at all.
BLOCK_SCHEMA = OBJECTS_SCHEMA.append(pa.field("listing_error", pa.string()))


@dataclass
class LabelOptions:
    """Everything `fpc-ray label` takes besides the locations."""

    run_id: str | None = None
    cam: str = "gradcam"
    thumb_size: int = 128
    batch_size: int = 32
    workers: int = 1
    use_gpu: bool = False
    frame_stride: int = 1
    full: bool = False
    max_error_rate: float = 0.5
    limit: int | None = None
    stale_staging_s: float = 24 * 3600.0  # staging attempts older than this are crashed runs'
    lock_wait_s: float = 900.0  # how long a commit waits for another commit on the same output
    max_object_bytes: int = 2 * 1024**3  # larger objects are error rows, never read (cine loops fit)
    uid_key: str | None = None  # a key to pseudonymize DICOM UIDs with (keyed hash), or keep them
    # "one": the one-stage design (read, decode, classify in each actor: the CPU path); "split":
    # CPU decode tasks -> GPU predictors -> CPU overlay tasks (see split.py); "auto": split on GPUs.
    stages: str = "auto"
    # JPEG frames decoded by the predictors in batches (nvJPEG) in the split design; None: on GPUs.
    jpeg_on_gpu: bool | None = None

    def split(self) -> bool:
        if self.stages not in ("auto", "one", "split"):
            raise UserError(f"stages {self.stages!r}: one of auto, one, split")
        return self.stages == "split" or (self.stages == "auto" and self.use_gpu)

    def predictor_decodes_jpeg(self) -> bool:
        return self.split() and (self.use_gpu if self.jpeg_on_gpu is None else self.jpeg_on_gpu)


def default_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


class PredictorActor:
    """The Ray Data stage: a :class:`~fpc_ray.label.predictor.Predictor` built in the actor.

    Handing Ray Data this torch-free class instead of ``Predictor`` itself keeps torch out of the
    driver, which only lists objects and reads cards (a second less of every run's start-up).
    """

    def __init__(self, **kwargs):
        from fpc_ray.label.predictor import Predictor

        self.predictor = Predictor(**kwargs)

    def __call__(self, batch: dict) -> pa.Table:
        return self.predictor(batch)


class SplitPredictorActor(PredictorActor):
    """The split design's predictor stage: a :class:`~fpc_ray.label.split.SplitPredictor` built in
    the actor (torch stays out of the driver here too)."""

    def __init__(self, **kwargs):
        from fpc_ray.label.split import SplitPredictor

        self.predictor = SplitPredictor(**kwargs)


def _object_blocks(todo: list[dict], batch_size: int, workers: int) -> list[pa.Table]:
    """The objects to label as Ray Data blocks of whole batches.

    Blocks split evenly (``from_items``) end in a remainder batch of one or two objects, and a
    predictor call costs the same forward pass for one image as for a few: whole batches per
    block keep every call full. A few batches per block amortise Ray Data's per-task cost while
    leaving at least four blocks per actor to balance the pool.
    """
    batches = -(-len(todo) // batch_size)
    per_block = max(1, min(BATCHES_PER_BLOCK, batches // (4 * workers)))
    rows = per_block * batch_size
    if batches < workers:  # fewer whole batches than actors: share them out
        rows = max(1, -(-len(todo) // workers))
    return [pa.Table.from_pylist(todo[i:i + rows], schema=BLOCK_SCHEMA) for i in range(0, len(todo), rows)]


def _one_stage(objects: list[dict], model_uri: str, run_id: str, opts: LabelOptions, storage: StorageConfig):
    """One stage of actors that read + decode on threads and classify (see resources.py for what
    each reserves and how many threads it runs)."""
    import ray
    from ray.data import ActorPoolStrategy

    sized = size_predictors(ray.nodes(), ray.cluster_resources(), opts.workers, opts.use_gpu)
    ds = ray.data.from_arrow(_object_blocks(objects, opts.batch_size, opts.workers))
    return ds.map_batches(
        PredictorActor,
        fn_constructor_kwargs={"model_uri": model_uri, "storage": storage.model_dump(), "cam": opts.cam,
                               "use_gpu": opts.use_gpu, "run_id": run_id, "thumb_size": opts.thumb_size,
                               "frame_stride": opts.frame_stride, "torch_threads": sized.torch_threads,
                               "decode_threads": sized.decode_threads,
                               "max_object_bytes": opts.max_object_bytes, "uid_key": opts.uid_key},
        batch_size=opts.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=opts.workers),
        num_cpus=sized.num_cpus, num_gpus=sized.num_gpus,
    )


def _split_stages(objects: list[dict], model_uri: str, card: dict, run_id: str, opts: LabelOptions,
                  storage: StorageConfig):
    """CPU decode tasks -> predictor actors -> CPU overlay tasks (see :mod:`fpc_ray.label.split`,
    and resources.py for how each stage is sized)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from fpc_ray.label.handover import decode_stage, overlay_stage

    sized = size_split(ray.nodes(), ray.cluster_resources(), opts.workers, opts.use_gpu, opts.batch_size)
    ds = ray.data.from_arrow(_object_blocks(objects, opts.batch_size, sized.decoders))
    ds = ds.map_batches(
        decode_stage, batch_size=opts.batch_size, batch_format="numpy", num_cpus=1,
        compute=TaskPoolStrategy(size=sized.decoders),
        fn_kwargs={"storage": storage.model_dump(), "input_size": card["input"]["size"],
                   "thumb_size": opts.thumb_size, "frame_stride": opts.frame_stride,
                   "keep_jpeg": opts.predictor_decodes_jpeg(), "max_object_bytes": opts.max_object_bytes,
                   "uid_key": opts.uid_key})
    # A GPU predictor reserves no CPU: Ray Data keeps it apart from the decode tasks. A CPU
    # predictor reserves one, like them, and Ray Data fuses the decode tasks into its actors.
    predictor = sized.predictor
    ds = ds.map_batches(
        SplitPredictorActor,
        fn_constructor_kwargs={"model_uri": model_uri, "storage": storage.model_dump(), "cam": opts.cam,
                               "use_gpu": opts.use_gpu, "thumb_size": opts.thumb_size,
                               "frames_per_pass": sized.predict_frames, "torch_threads": predictor.torch_threads},
        batch_size=sized.predict_frames, batch_format="numpy", num_cpus=predictor.num_cpus,
        num_gpus=predictor.num_gpus,
        # Batches queued at each actor: the next is on its node while the GPU works on this one.
        compute=ActorPoolStrategy(size=opts.workers, max_tasks_in_flight_per_actor=PREDICTOR_QUEUE))
    return ds.map_batches(
        overlay_stage, batch_size=OVERLAY_BATCH, batch_format="numpy", num_cpus=OVERLAY_CPUS,
        compute=TaskPoolStrategy(size=sized.overlays),
        fn_kwargs={"class_names": card["class_names"], "version": card["version"], "run_id": run_id,
                   "input_size": card["input"]["size"]})


def _label(todo: list[dict], staged: Location, model_uri: str, card: dict, run_id: str, opts: LabelOptions,
           storage: StorageConfig, echo) -> None:
    """Run the Ray Data pipeline over ``todo``, writing rows into ``staged``."""
    from fpc_ray.cluster import init_ray

    init_ray()
    if opts.split():
        ds = _split_stages(todo, model_uri, card, run_id, opts, storage)
    else:
        ds = _one_stage(todo, model_uri, run_id, opts, storage)
    configure_ray_data()
    try:
        # Parquet writes are light: a quarter CPU each, so they never queue behind the
        # predictors for a whole core (measured +20 % labelling throughput on 2 CPUs).
        with StagedRowsWatcher(lambda: parquet_parts(staged), staged.fs, len(todo), echo):
            ds.write_parquet(staged.path, filesystem=staged.fs, schema=schema_with_metadata(card),
                             ray_remote_args={"num_cpus": WRITE_CPUS})
    except Exception as e:  # storage outage or lost workers, after Ray's and S3's retries
        raise ray_failure(e, f"labelling run {run_id} failed, nothing committed") from e


def _normalised(loc: Location) -> str:
    """A location as compared for nesting: a local path resolved (links, ``..``), an S3 bucket/key."""
    return os.path.realpath(loc.path) if not is_remote(loc.uri) else f"s3://{loc.path.strip('/')}"


def _refuse_overlap(sources: list[Location], output: Location) -> None:
    """Refuse an output inside (or equal to) an input prefix, or an input inside the output: later
    runs would list the output's own parts, index and lock as archive objects."""
    out = _normalised(output)
    for source in sources:
        src = _normalised(source)
        if out == src or out.startswith(src.rstrip("/") + "/") or src.startswith(out.rstrip("/") + "/"):
            raise UserError(f"--output {output.uri} and --input {source.uri} overlap: a run would read its "
                            "own output as archive objects; choose an output outside every input prefix")


def _open_run(model_uri: str, inputs: list[str], output_uri: str, opts: LabelOptions, storage: StorageConfig,
              echo) -> tuple[str, dict, list[Location], Attempt]:
    """The model (pointer followed), its card, the input prefixes and this run's attempt, checked
    before anything is listed: a committed run id, an output that cannot be written."""
    if opts.run_id is not None:  # before anything is read or written
        check_run_id(opts.run_id)
    if not inputs:
        raise UserError("no input prefix given")
    model_uri = follow_pointer(model_uri, storage)  # once: every actor loads the same bundle
    # Card and weights checked here, once: a damaged bundle would fail every actor with a traceback
    # and the run would look like an outage (exit 1) to a scheduler that then retries it forever.
    card = check_bundle(model_uri, storage)
    sources, output = [resolve(u, storage) for u in inputs], resolve(output_uri, storage)
    _refuse_overlap(sources, output)
    # A defaulted id (this second) moves on to a free one; a given id is the user's to change.
    run_id = opts.run_id or free_run_id(output, default_run_id())
    attempt = Attempt(output, run_id)
    if attempt.run_dir.join(SUCCESS).exists():
        raise UserError(f"run {run_id} is already committed under {output.uri}; choose another --run-id")
    output.check_writable()
    clean_stale_staging(output, opts.stale_staging_s, echo)
    return model_uri, card, sources, attempt


def _objects_to_label(sources: list[Location], attempt: Attempt, opts: LabelOptions, echo) -> tuple[list, list]:
    """(every object listed, those to label): what no committed run holds, or all with ``full``.

    Notes the committed runs seen as the attempt's baseline (see :func:`runs.commit`)."""
    listed = list_inputs(sources)
    committed, attempt.baseline = committed_objects(attempt.output, echo)
    todo = listed if opts.full else objects_not_in(listed, object_keys(committed))
    return listed, todo if opts.limit is None else todo[: opts.limit]


def _staged_rows(attempt: Attempt, opts: LabelOptions) -> int:
    """The rows staged, refused where more than ``max_error_rate`` of them are error rows."""
    rows, _, _, errors = summarise_rows(parquet_parts(attempt.staged), attempt.staged.fs)
    n_errors = sum(errors.values())
    if rows and n_errors / rows > opts.max_error_rate:
        raise UserError(f"{n_errors} of {rows} rows failed to decode ({dict(errors)}), above "
                        f"--max-error-rate {opts.max_error_rate}; nothing committed")
    return rows


def _summary(attempt: Attempt, model_uri: str, card: dict, sources: list[Location], listed: list, todo: list,
             opts: LabelOptions, timings: dict) -> dict:
    """The run's summary before the commit adds its counts (see :func:`runs.commit`)."""
    return {
        "run_id": attempt.run_id, "model_version": card["version"], "model_uri": model_uri,
        "input": sources[0].uri, "inputs": [s.uri for s in sources], "output": attempt.run_dir.uri,
        "objects": {"listed": len(listed), "skipped": len(listed) - len(todo), "labelled": len(todo)},
        "options": {"cam": opts.cam, "thumb_size": opts.thumb_size, "frame_stride": opts.frame_stride,
                    "full": opts.full, "workers": opts.workers, "use_gpu": opts.use_gpu,
                    "stages": "split" if opts.split() else "one", "jpeg_on_gpu": opts.predictor_decodes_jpeg()},
        "timings": timings,
    }


def run_labelling(model_uri: str, input_uri: str | list[str], output_uri: str, opts: LabelOptions,
                  storage: StorageConfig | None = None, echo=print) -> dict:
    """Label every new object under ``input_uri`` (one prefix or several) and commit a run
    under ``output_uri``.

    Returns:
        The run's summary (the content of ``_SUCCESS.json``).

    Raises:
        UserError: bad locations or model; too many per-object errors (nothing is committed).
        RunFailed: an outage, lost workers, or another attempt committed this run id meanwhile.
    """
    started = time.perf_counter()
    storage = storage or StorageConfig()
    inputs = [input_uri] if isinstance(input_uri, str | os.PathLike) else list(input_uri)
    model_uri, card, sources, attempt = _open_run(model_uri, inputs, output_uri, opts, storage, echo)
    listed, todo = _objects_to_label(sources, attempt, opts, echo)
    where = sources[0].uri if len(sources) == 1 else f"{len(sources)} prefixes"
    echo(f"run {attempt.run_id}: {len(listed)} objects under {where}, {len(listed) - len(todo)} already "
         f"labelled, {len(todo)} to label with model {card['version']} (attempt {attempt.attempt_id})")
    list_s = time.perf_counter() - started
    try:
        attempt.staged.makedirs()
        t0 = time.perf_counter()
        if todo:
            _label(todo, attempt.staged, model_uri, card, attempt.run_id, opts, storage, echo)
        label_s = time.perf_counter() - t0
        rows = _staged_rows(attempt, opts)
        timings = {"list_s": round(list_s, 3), "label_s": round(label_s, 3),
                   "rows_per_s": round(rows / label_s, 2) if label_s > 0 and rows else None}
        summary = _summary(attempt, model_uri, card, sources, listed, todo, opts, timings)
        try:
            return commit(attempt, todo, summary, storage, echo, opts.lock_wait_s, started)
        except (OSError, pa.ArrowException) as e:  # not already one line (guarded storage calls are)
            raise RunFailed(f"run {attempt.run_id}: commit under {attempt.output.uri} failed, not committed: "
                            f"{failure_line(e)}") from None
    finally:
        attempt.discard()  # this attempt's own staging, whatever happened; never another's
