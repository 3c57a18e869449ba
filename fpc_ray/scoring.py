"""Scoring a model on labelled images: decoded arrays, a split as a Ray Dataset, or a bundle on a
split of one or more datasets.

Training scores its val and test splits with :func:`report_from_logits`, on logits from
:func:`split_logits` (the arrays ingest path) or :func:`dataset_logits` (the Ray Data path: the
model runs in Ray Data tasks beside the decoding);
``fpc-ray evaluate``, the demo and the retraining loop score bundles with :func:`evaluate_bundle`.
Probabilities are the calibrated ones (the bundle's temperature); each report also holds the ECE
and reliability bins of the uncalibrated probabilities, for the before/after comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fpc_ray.config import StorageConfig
from fpc_ray.inference import place_model, predict_logits, select_device, softmax_t
from fpc_ray.metrics import classification_report, expected_calibration_error, reliability_bins

# What the per-dataset rows of a report keep of each dataset's own report.
PER_DATASET_KEYS = ("n", "top1", "top2", "macro_f1", "ece")


def split_logits(model: torch.nn.Module, image_sets: Sequence[np.ndarray], mean, std, batch_size: int = 64,
                 use_gpu: bool = False) -> list[np.ndarray]:
    """The logits of ``model`` on each array of decoded images (one model placement for all)."""
    device = select_device(use_gpu)
    placed = place_model(model, device)
    return [predict_logits(placed, images, mean, std, batch_size, device) for images in image_sets]


def _score_batch(batch: dict[str, np.ndarray], model, mean, std, batch_size: int, use_gpu: bool) -> dict:
    """A Ray Data task: the logits of a batch of decoded rows, with their index and label."""
    import ray

    model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
    (logits,) = split_logits(model, [batch["image"]], mean, std, batch_size, use_gpu)
    return {"index": batch["index"], "label": batch["label"], "logits": logits}


def dataset_logits(dataset, model: torch.nn.Module, mean, std, batch_size: int = 64, use_gpu: bool = False,
                   num_cpus: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The logits of ``model`` on every row of a decoded split (a Ray Dataset of ``index``,
    ``label``, ``image``) and the rows' labels, in row order.

    The model runs in Ray Data tasks of ``num_cpus`` CPUs (and a GPU with ``use_gpu``) wherever
    the cluster has room, next to the blocks; only the logits come back to this process.
    """
    import ray

    scored = dataset.map_batches(
        _score_batch, batch_format="numpy", batch_size=4 * batch_size, num_cpus=num_cpus,
        num_gpus=1 if use_gpu else 0,
        fn_kwargs={"model": ray.put(model), "mean": mean, "std": std, "batch_size": batch_size, "use_gpu": use_gpu})
    index, labels, logits = [], [], []
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        index.append(batch["index"])
        labels.append(batch["label"])
        logits.append(batch["logits"])
    if not index:
        return np.zeros((0, getattr(model, "num_classes", 0)), np.float32), np.zeros(0, np.int64)
    order = np.argsort(np.concatenate(index), kind="stable")
    return np.concatenate(logits)[order], np.concatenate(labels)[order]


def report_from_logits(logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                       temperature: float = 1.0) -> dict:
    """The classification report of softmax(logits / temperature), with the uncalibrated ECE and
    reliability bins beside the calibrated ones."""
    report = classification_report(softmax_t(logits, temperature), labels, class_names)
    uncalibrated = softmax_t(logits, 1.0).astype(np.float64)  # as classification_report reads probabilities
    report.update(temperature=float(temperature),
                  ece_uncalibrated=expected_calibration_error(uncalibrated, labels),
                  reliability_uncalibrated=reliability_bins(uncalibrated, labels))
    return report


def evaluate_bundle(model_uri: str, data_uri: str | Sequence[str], split: str = "test", batch_size: int = 64,
                    use_gpu: bool = False, storage: StorageConfig | None = None, cache: str = "auto") -> dict:
    """Evaluate a bundle on a split of one or more FETAL_PLANES_DB-layout datasets, calibrated with
    the bundle's temperature.

    Each dataset's split is cut exactly as in training (the bundle's ``val_fraction`` and
    ``split_seed``, per dataset), so ``--split val`` scores the same patients the run validated on.
    The split is decoded on the ingest path that :func:`~fpc_ray.data.ingest.choose_ingest` picks
    for ``cache`` (``data.cache``): here, or in Ray Data tasks that run the model beside the
    decoding. The report is over the union of the splits; ``per_dataset`` holds each dataset's own
    scores (None where its split is empty).
    """
    from fpc_ray.bundle import load_bundle
    from fpc_ray.cluster import init_ray
    from fpc_ray.data.ingest import choose_ingest, decoded_bytes, driver_free_bytes, object_store_bytes
    from fpc_ray.data.multi import decode_joined, joined_fingerprint, read_datasets
    from fpc_ray.errors import UserError

    bundle = load_bundle(model_uri, storage)
    data_cfg = bundle.config.data
    parts = read_datasets(data_uri, data_cfg.val_fraction, data_cfg.split_seed, storage)
    for part in parts:
        unknown = {r.plane for r in part.splits[split]} - set(bundle.class_names)
        if unknown:
            raise UserError(f"{part.uri}: classes {sorted(unknown)} are not in the model's classes")
    if not any(part.splits[split] for part in parts):
        raise UserError(f"{', '.join(p.uri for p in parts)}: the {split} split is empty")
    size, mean, std = bundle.card["input"]["size"], bundle.card["input"]["mean"], bundle.card["input"]["std"]

    def object_store() -> float:
        init_ray()
        return object_store_bytes()

    images = sum(len(p.splits[split]) for p in parts)
    ingest, _ = choose_ingest(cache, decoded_bytes(images, size), driver_free_bytes(), object_store)
    if ingest == "arrays":
        arrays = decode_joined(parts, split, size, data_cfg.decode_threads)
        (logits,) = split_logits(bundle.model, [arrays.images], mean, std, batch_size, use_gpu)
    else:
        logits = _ray_data_logits(bundle, parts, split, batch_size, use_gpu, storage, f"scoring {model_uri} on the "
                                  f"{split} split")
    # The datasets' label indices follow their own class order; map them into the model's.
    labels = np.array([bundle.class_names.index(r.plane) for p in parts for r in p.splits[split]], dtype=np.int64)
    report = report_from_logits(logits, labels, bundle.class_names, bundle.temperature)
    report.update(split=split, model_version=bundle.version,
                  data_fingerprint=joined_fingerprint([p.db.fingerprint for p in parts]),
                  per_dataset=_per_dataset(parts, split, logits, labels, bundle.class_names, bundle.temperature))
    return report


def _ray_data_logits(bundle, parts, split: str, batch_size: int, use_gpu: bool, storage: StorageConfig | None,
                     what: str) -> np.ndarray:
    """The Ray Data path of :func:`evaluate_bundle`: the split's logits, in row order."""
    from fpc_ray.cluster import init_ray
    from fpc_ray.data.ingest import quiet_data_logs, split_dataset, split_rows
    from fpc_ray.errors import ray_failure

    init_ray()
    quiet_data_logs()
    dataset = split_dataset(split_rows(parts, split), bundle.card["input"]["size"],
                            (storage or StorageConfig()).model_dump(mode="json"), bundle.config.data.decode_threads)
    try:
        logits, _ = dataset_logits(dataset, bundle.model, bundle.card["input"]["mean"], bundle.card["input"]["std"],
                                   batch_size, use_gpu)
    except Exception as e:
        if type(e).__module__.split(".")[0] != "ray":
            raise  # a bug, or already one line
        raise ray_failure(e, what) from e
    return logits


def _per_dataset(parts, split: str, logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                 temperature: float) -> list[dict]:
    """Each dataset's scores, from its rows of the joined logits."""
    rows, start = [], 0
    for part in parts:
        end = start + len(part.splits[split])
        row = {"uri": part.uri, "fingerprint": part.db.fingerprint, "n": end - start}
        if end > start:
            report = report_from_logits(logits[start:end], labels[start:end], class_names, temperature)
            row.update({key: report[key] for key in PER_DATASET_KEYS})
            # Recall of each class present: where a reviewed class got better (or worse) shows.
            row["recall"] = {name: c["recall"] for name, c in report["per_class"].items() if c["support"]}
        else:
            row.update({key: None for key in PER_DATASET_KEYS if key != "n"})
            row["recall"] = {}
        rows.append(row)
        start = end
    return rows
