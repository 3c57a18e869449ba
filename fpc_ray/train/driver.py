"""``fpc-ray train``'s driver: read and split the data, decode it on the chosen ingest path
(:func:`fpc_ray.data.ingest.choose_ingest`), run Ray Train, calibrate, write the bundle."""

from __future__ import annotations

import datetime as dt
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fpc_ray.bundle import CARD_FILE, Bundle, build_card, load_bundle, save_bundle, weights_bytes
from fpc_ray.cluster import init_ray, uses_external_cluster
from fpc_ray.config import Config
from fpc_ray.data.dataset import SplitArrays
from fpc_ray.data.fetal_planes import CLASS_NAMES
from fpc_ray.data.multi import SPLITS, DatasetSplits, decode_joined, joined_fingerprint, joined_uri, read_datasets
from fpc_ray.errors import UserError, ray_failure
from fpc_ray.storage import Location, is_remote, resolve

RAY_DIR = "ray"  # Ray Train's run storage (checkpoints, state), inside the output folder


@dataclass
class PreparedData:
    """Datasets read, split by patient (each by its own patients) and joined, each split ready on
    one ingest path (a search shares them between trials): ``arrays`` decoded on the driver, or
    ``datasets`` of rows that Ray Data tasks decode (materialized once under ``memory``)."""

    parts: list[DatasetSplits]
    labels: dict[str, np.ndarray]  # each split's labels, in row order
    image_size: int
    ingest: str  # "arrays", "memory" or "stream"
    arrays: dict[str, SplitArrays] | None = None  # the arrays path
    datasets: dict[str, object] | None = None  # the Ray Data path: split -> ray.data.Dataset (None if empty)

    @property
    def data_uris(self) -> list[str]:
        return [part.uri for part in self.parts]


def prepare_data(cfg: Config, data_uri: str | Sequence[str], batch_size: int | None = None) -> PreparedData:
    """Read each FETAL_PLANES_DB CSV, split it train/val/test by its patients, join the datasets'
    splits, and make them ready on the path :func:`~fpc_ray.data.ingest.choose_ingest` picks:
    decoded here once, or Ray Datasets that Ray Data tasks decode. ``batch_size``: the smallest
    batch the runs on it take (default the config's; a search's space may hold smaller ones than
    its base config)."""
    from fpc_ray.data.ingest import choose_ingest, decoded_bytes, driver_free_bytes, ingest_line, object_store_bytes

    started = time.perf_counter()
    parts = read_datasets(data_uri, cfg.data.val_fraction, cfg.data.split_seed, cfg.storage)
    for name in ("train", "val"):
        if not any(part.splits[name] for part in parts):
            raise UserError(f"{joined_uri([p.uri for p in parts])}: the {name} split is empty "
                            f"(too few patients with Train=1?)")
    _check_one_batch_each(sum(len(part.splits["train"]) for part in parts), cfg.train.num_workers,
                          batch_size or cfg.train.batch_size)  # before minutes of decoding
    for part in parts:
        print(_split_summary(part), flush=True)
    size = cfg.data.image_size
    images = sum(len(part.splits[name]) for part in parts for name in SPLITS)
    decoded = decoded_bytes(images, size)

    def object_store() -> float:
        init_ray()
        return object_store_bytes()

    ingest, why = choose_ingest(cfg.data.cache, decoded, driver_free_bytes(), object_store)
    print(ingest_line(ingest, why, decoded), flush=True)
    labels = {name: np.array([r.label for part in parts for r in part.splits[name]], dtype=np.int64)
              for name in SPLITS}
    if ingest == "arrays":
        arrays = {name: decode_joined(parts, name, size, cfg.data.decode_threads) for name in SPLITS}
        print(f"decoded {images} images at {size} px in {time.perf_counter() - started:.1f}s", flush=True)
        return PreparedData(parts, labels, size, ingest, arrays=arrays)
    init_ray()
    datasets = _ray_datasets(cfg, parts, ingest)
    if ingest == "memory":
        print(f"decoded {images} images at {size} px in {time.perf_counter() - started:.1f}s (Ray Data tasks)",
              flush=True)
    return PreparedData(parts, labels, size, ingest, datasets=datasets)


def _ray_datasets(cfg: Config, parts: list[DatasetSplits], ingest: str) -> dict[str, object]:
    """Each split as a Ray Dataset of rows (None where empty); train's rows shuffled once before
    being cut into blocks, so each block is a random mix that the workers' seeded local shuffle
    mixes again every epoch."""
    from fpc_ray.data.ingest import split_rows

    rows = {name: split_rows(parts, name) for name in SPLITS}
    random.Random(cfg.train.seed).shuffle(rows["train"])
    return {name: _split_dataset(cfg, split, ingest) for name, split in rows.items()}


def _split_dataset(cfg: Config, rows: list[dict], cache: str):
    """A split's Ray Dataset; under ``memory``, decoded now and kept in the object store."""
    from fpc_ray.data.ingest import quiet_data_logs, split_dataset

    if not rows:
        return None
    quiet_data_logs()
    ds = split_dataset(rows, cfg.data.image_size, cfg.storage.model_dump(mode="json"), cfg.data.decode_threads)
    if cache != "memory":
        return ds
    try:
        return ds.materialize()
    except Exception as e:
        if isinstance(e, UserError):
            raise
        raise ray_failure(e, "decoding the data") from e


@dataclass
class TrainingOutcome:
    """What a finished training run produced."""

    bundle_uri: str
    card: dict
    history: list[dict]


def check_workers_fit(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float = 1.0) -> None:
    """Fail fast where a local cluster can never place the workers (Ray would wait forever).

    A cluster named by ``RAY_ADDRESS`` may autoscale, so only the local one is checked. Workers
    with a fraction of a GPU each share GPUs (two with 0.5 fit one).
    """
    import ray

    if uses_external_cluster():
        return
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if num_workers * cpus_per_worker > cpus:
        raise UserError(f"{num_workers} worker(s) x {cpus_per_worker:g} CPUs (train.cpus_per_worker) "
                        f"do not fit this machine's {cpus:g} CPUs")
    if use_gpu and num_workers * gpus_per_worker > gpus:
        raise UserError(f"{num_workers} GPU worker(s) x {gpus_per_worker:g} GPUs (train.gpus_per_worker) "
                        f"do not fit this machine's {gpus:g} GPUs")


def _split_summary(part: DatasetSplits) -> str:
    counts = [f"{name} {len(records)} images / {len({r.patient for r in records})} patients"
              for name, records in part.splits.items()]
    return f"data: {part.db.root.uri}: " + ", ".join(counts)


def _fit(trainer, what: str):
    """``trainer.fit()``, with Ray Train's failure (after its restarts) turned into one line."""
    import ray.train
    from ray.train.base_trainer import TrainingFailedError as V1TrainingFailedError

    try:
        return trainer.fit()
    except (ray.train.TrainingFailedError, V1TrainingFailedError) as e:  # Train v2; v1 with RAY_TRAIN_V2_ENABLED=0
        raise ray_failure(e, what) from e


def _run_storage(out: Location) -> tuple[str, object]:
    """Ray's storage_path and filesystem for the run folder under the output."""
    ray_loc = out.join(RAY_DIR)
    if is_remote(out.uri):
        return ray_loc.path, ray_loc.fs
    return ray_loc.path, None


def run_training(cfg: Config, data_uri: str | Sequence[str], output_uri: str, overwrite: bool = False, *,
                 prepared: PreparedData | None = None, run_name: str | None = None,
                 callbacks: list | None = None) -> TrainingOutcome:
    """Train on one or more FETAL_PLANES_DB-layout datasets and write a model bundle to ``output_uri``.

    Several datasets are split each by its own patients and joined (:mod:`fpc_ray.data.multi`).
    After training, a temperature is fitted on the validation split (:mod:`fpc_ray.calibration`);
    the card records it, and the test report is calibrated with it.

    ``prepared`` reuses data decoded by :func:`prepare_data`; ``run_name`` fixes Ray Train's run
    folder (a rerun with the same name resumes from its checkpoints); ``callbacks`` go to Ray
    Train's RunConfig (a search passes Tune's report callback).

    Raises:
        UserError: on bad data, output or init bundle (also when a worker raised one).
        RunFailed: when Ray Train fails more often than ``train.max_failures`` allows, or the
            test evaluation's Ray task is lost; the message names the run and the root cause.
    """
    from fpc_ray.train.loop import quiet_report_logs

    out = _check_output(output_uri, cfg, overwrite)
    cfg, parent = _with_parent(cfg)
    started = time.perf_counter()
    tc = cfg.train
    if prepared is None or prepared.image_size != cfg.data.image_size:
        prepared = prepare_data(cfg, data_uri)  # checks the batch size itself, before decoding
    else:  # data prepared once for several runs: a search's trials differ in batch size
        _check_one_batch_each(len(prepared.labels["train"]), tc.num_workers, tc.batch_size)
    if tc.num_workers:
        init_ray()
        check_workers_fit(tc.num_workers, tc.cpus_per_worker, tc.use_gpu, tc.gpus_per_worker)
    run_name = run_name or "train-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    what = f"training run {run_name} for {out.uri}"
    quiet_report_logs()  # an in-process run reports in this process (and Ray Train logs its set-up)
    trainer = _build_trainer(cfg, prepared, parent, out, run_name, callbacks)
    result = _fit(trainer, f"{what} failed after {tc.max_failures} restart(s)")

    model, history, best = _trained_model(cfg, result.checkpoint)
    calibration, test_report = _calibrate_and_score(cfg, model, prepared, what)
    blob = weights_bytes(model.state_dict())
    card = _card(cfg, prepared, model, blob, history, best, test_report, calibration, parent,
                 wall_s=time.perf_counter() - started,
                 ray_run=out.join(RAY_DIR, run_name).uri if tc.num_workers else None)
    save_bundle(out, blob, card, history)
    return TrainingOutcome(out.uri, card, history)


def _check_one_batch_each(train_images: int, num_workers: int, batch_size: int) -> None:
    """Epochs take whole batches only: a worker whose share of the train split is under one batch
    would take no step at all, and a run of untrained weights would pass for a trained one."""
    workers = max(1, num_workers)
    if train_images // workers < batch_size:
        raise UserError(f"the train split has {train_images} images: {train_images // workers} for each of {workers} "
                        f"worker(s), fewer than one batch of {batch_size}; lower --batch-size (train.batch_size)")


def _check_output(output_uri: str, cfg: Config, overwrite: bool) -> Location:
    """The output location, refused where it already holds a bundle (unless ``overwrite``) or is
    not writable."""
    out = resolve(output_uri, cfg.storage)
    if out.join(CARD_FILE).exists() and not overwrite:
        raise UserError(f"{out.uri} already holds a model bundle; choose another --output or pass --overwrite")
    out.check_writable()
    return out


def _with_parent(cfg: Config) -> tuple[Config, Bundle | None]:
    """The bundle ``train.init_from`` names (or None), and the config with its model section:
    continuing means the same architecture."""
    if not cfg.train.init_from:
        return cfg, None
    parent = load_bundle(cfg.train.init_from, cfg.storage)
    if parent.class_names != list(CLASS_NAMES):
        raise UserError(f"{cfg.train.init_from}: its classes {parent.class_names} differ from {list(CLASS_NAMES)}")
    return cfg.model_copy(update={"model": parent.config.model}), parent


def _build_trainer(cfg: Config, prepared: PreparedData, parent: Bundle | None, out: Location, run_name: str,
                   callbacks: list | None):
    """Ray Train's TorchTrainer for the run: the data shared once (the arrays as object refs, or
    the Ray Datasets, whose train split each worker streams an equal share of), storage under the
    output."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fpc_ray.train.loop import train_loop_per_worker

    tc = cfg.train
    in_process = tc.num_workers == 0
    share = (lambda x: x) if in_process else ray.put
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "ingest": prepared.ingest,
        "class_names": list(CLASS_NAMES),
        "init_weights": share(parent.model.state_dict()) if parent else None,
        # In a terminal, a line at each quarter epoch too (epochs on real data take minutes).
        "progress_within_epoch": sys.stdout.isatty(),
    }
    datasets = None
    if prepared.ingest == "arrays":
        loop_config.update(train=share(prepared.arrays["train"]), val=share(prepared.arrays["val"]))
    else:  # the labels only (class weights, step count): each worker reads its images from its shard
        loop_config["train_labels"] = prepared.labels["train"]
        # Every worker reads all of val (and scores every world-th row, so validation is exact).
        datasets = {name: prepared.datasets[name] for name in ("train", "val")}
    storage_path, storage_fs = _run_storage(out)
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})
    # Workers with a fraction of a GPU may share one, and NCCL refuses two ranks on one device:
    # gloo then all-reduces the CUDA gradients through host copies (slower, but it runs).
    # Otherwise Ray's default: NCCL on GPUs, gloo on CPUs.
    shares_gpus = tc.use_gpu and tc.gpus_per_worker < 1 and tc.num_workers > 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None,
        torch_config=TorchConfig(backend="gloo") if shares_gpus else None,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker=None if in_process else resources,
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            # Ray Train's print patch would echo each progress line twice on the driver.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute="val_top1", checkpoint_score_order="max",
            ),
        ),
    )


def _trained_model(cfg: Config, checkpoint) -> tuple[object, list[dict], dict]:
    """The best epoch's model (in eval mode), the history and the best epoch's metrics, from the
    run's latest checkpoint; an in-process run's checkpoint folder in /tmp is removed after."""
    from fpc_ray.model import build_model
    from fpc_ray.train.checkpoint import best_weights, discard_local_checkpoint, read_history

    with checkpoint.as_directory() as path:
        weights = best_weights(path)
        history, best = read_history(path)
    discard_local_checkpoint(checkpoint.path)
    model = build_model(cfg.model, len(CLASS_NAMES), pretrained=False)
    model.load_state_dict(weights)
    model.eval()
    return model, history, best


def _calibrate_and_score(cfg: Config, model, prepared: PreparedData, what: str) -> tuple[dict, dict | None]:
    """The card's calibration (a temperature fitted on the validation logits) and the calibrated
    report on the test split (None when it is empty)."""
    from fpc_ray.calibration import calibration_record
    from fpc_ray.scoring import report_from_logits

    if prepared.ingest == "arrays":
        val_logits, test_logits = _array_logits(cfg, model, [prepared.arrays[n].images for n in ("val", "test")], what)
    else:
        val_logits, test_logits = (_dataset_logits(cfg, model, prepared.datasets[n], what) for n in ("val", "test"))
    labels = prepared.labels  # in row order, as the logits of either path
    calibration = calibration_record(val_logits, labels["val"], fitted_on="val")
    if not len(labels["test"]):
        return calibration, None
    return calibration, report_from_logits(test_logits, labels["test"], list(CLASS_NAMES), calibration["temperature"])


def _array_logits(cfg: Config, model, image_sets: list[np.ndarray], what: str) -> list[np.ndarray]:
    """The arrays path: the best model's logits on each image set. An in-process run computes them here; a run on
    Ray in a Ray task where the workers' resources (and GPUs) are: the driver may hold no CPU (a
    Tune trial reserves none; a KubeRay head node has none)."""
    import ray
    import ray.exceptions

    from fpc_ray.model import normalization
    from fpc_ray.scoring import split_logits

    tc = cfg.train
    mean, std = normalization(cfg.model.backbone)
    args = (model, image_sets, mean, std, 2 * tc.batch_size, tc.use_gpu)
    if tc.num_workers == 0:
        return split_logits(*args)
    # DEFAULT: not inside the placement group of a Tune trial that runs this driver
    remote = ray.remote(split_logits).options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0,
                                              scheduling_strategy="DEFAULT")
    try:
        return ray.get(remote.remote(*args))
    except ray.exceptions.RayTaskError as e:  # split_logits itself raised
        if isinstance(e.cause, UserError):
            raise ray_failure(e, f"{what}: scoring the best model") from e
        raise  # a bug: keep the traceback
    except ray.exceptions.RayError as e:  # its worker or node was lost
        raise ray_failure(e, f"{what}: scoring the best model failed") from e


def _dataset_logits(cfg: Config, model, dataset, what: str) -> np.ndarray | None:
    """The Ray Data path: the best model's logits on a split (None where it is empty), in row
    order, scored by Ray Data tasks with the workers' resources (and GPUs), next to the blocks."""
    from fpc_ray.model import normalization
    from fpc_ray.scoring import dataset_logits

    if dataset is None:
        return None
    tc = cfg.train
    mean, std = normalization(cfg.model.backbone)
    try:
        return dataset_logits(dataset, model, mean, std, 2 * tc.batch_size, tc.use_gpu, tc.cpus_per_worker)[0]
    except UserError:
        raise
    except Exception as e:  # a decode task found a damaged image (stream cache), or a node was lost
        if not _is_ray_error(e):
            raise  # a bug: keep the traceback
        raise ray_failure(e, f"{what}: scoring the best model") from e


def _is_ray_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "ray"


def _card(cfg: Config, prepared: PreparedData, model, blob: bytes, history: list[dict], best: dict,
          test_report: dict | None, calibration: dict, parent: Bundle | None, *, wall_s: float,
          ray_run: str | None) -> dict:
    """The bundle's card: config, data (every dataset's URI, fingerprint and split sizes; the joined
    counts), metrics, calibration, training and lineage."""
    from fpc_ray.model import count_parameters

    tc = cfg.train
    class_counts = {
        name: dict(zip(CLASS_NAMES, np.bincount(a, minlength=len(CLASS_NAMES)).tolist(), strict=True))
        for name, a in prepared.labels.items()
    }
    parts = prepared.parts
    fingerprint = joined_fingerprint([p.db.fingerprint for p in parts])
    return build_card(
        cfg, list(CLASS_NAMES), count_parameters(model), blob,
        # ``data`` describes the joined data (for one dataset, that dataset); ``datasets`` each one.
        data={"uri": joined_uri(prepared.data_uris), "fingerprint": fingerprint, "images": class_counts,
              # Patients are per dataset: patient 7 of one dataset is not patient 7 of another.
              "patients": {n: sum(len({r.patient for r in p.splits[n]}) for p in parts) for n in SPLITS}},
        datasets=[part.card_entry() for part in parts],
        metrics={"val": {k: best[k] for k in ("epoch", "val_top1", "val_top2", "val_loss")},
                 "test": test_report},
        calibration=calibration,
        training={"epochs": len(history), "best_epoch": best["epoch"], "num_workers": tc.num_workers,
                  "use_gpu": tc.use_gpu, "wall_s": round(wall_s, 1), "ray_run": ray_run},
        lineage={"parent_version": parent.version, "parent_uri": tc.init_from} if parent else None,
    )
