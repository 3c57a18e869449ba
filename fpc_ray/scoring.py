"""Scoring a model on labelled images: decoded arrays, or a bundle on a dataset split.

Training scores its test split with :func:`evaluate_arrays`; ``fpc-ray evaluate``, the demo and
the retraining loop score bundles with :func:`evaluate_bundle`.
"""

from __future__ import annotations

import numpy as np
import torch

from fpc_ray.config import StorageConfig
from fpc_ray.inference import place_model, predict_probs, select_device
from fpc_ray.metrics import classification_report


def evaluate_arrays(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                    class_names: list[str], mean, std, batch_size: int = 64,
                    use_gpu: bool = False) -> dict:
    """The full classification report of ``model`` on decoded images."""
    device = select_device(use_gpu)
    probs = predict_probs(place_model(model, device), images, mean, std, batch_size, device)
    return classification_report(probs, labels, class_names)


def evaluate_bundle(model_uri: str, data_uri: str, split: str = "test", batch_size: int = 64,
                    use_gpu: bool = False, storage: StorageConfig | None = None) -> dict:
    """Evaluate a bundle on a split of a FETAL_PLANES_DB-layout dataset.

    The split is cut exactly as in training (the bundle's ``val_fraction`` and ``split_seed``), so
    ``--split val`` scores the same patients the run validated on.
    """
    from fpc_ray.bundle import load_bundle
    from fpc_ray.data.dataset import decode_split
    from fpc_ray.data.fetal_planes import read_fetal_planes
    from fpc_ray.errors import UserError

    bundle = load_bundle(model_uri, storage)
    db = read_fetal_planes(data_uri, storage)
    data_cfg = bundle.config.data
    records = db.split(split, data_cfg.val_fraction, data_cfg.split_seed)
    if not records:
        raise UserError(f"{data_uri}: the {split} split is empty")
    dataset_classes = {r.plane for r in records}
    unknown = dataset_classes - set(bundle.class_names)
    if unknown:
        raise UserError(f"{data_uri}: classes {sorted(unknown)} are not in the model's classes")
    arrays = decode_split(db, records, bundle.card["input"]["size"], data_cfg.decode_threads)
    # The dataset's label indices follow its own class order; map them into the model's.
    labels = np.array([bundle.class_names.index(r.plane) for r in records], dtype=np.int64)
    report = evaluate_arrays(bundle.model, arrays.images, labels, bundle.class_names,
                             bundle.card["input"]["mean"], bundle.card["input"]["std"],
                             batch_size, use_gpu)
    report.update(split=split, model_version=bundle.version, data_fingerprint=db.fingerprint)
    return report
