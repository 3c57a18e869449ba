"""Prediction over decoded images, and ``fpc-ray evaluate``."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch

from fpc_ray.config import StorageConfig
from fpc_ray.data.transforms import eval_transform
from fpc_ray.metrics import classification_report


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: np.ndarray, mean, std, batch_size: int = 64,
                  device: torch.device | str = "cpu", amp: bool = True) -> np.ndarray:
    """Softmax probabilities for letterboxed uint8 images (N x S x S), in the model's class order."""
    device = torch.device(device)
    transform = eval_transform(mean, std)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image=im)["image"] for im in images[start : start + batch_size]])
        batch = batch.to(device, non_blocking=True)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(batch)
        out.append(logits.float().softmax(dim=1).cpu().numpy())
    n_classes = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def evaluate_arrays(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                    class_names: list[str], mean, std, batch_size: int = 64,
                    use_gpu: bool = False) -> dict:
    """The full classification report of ``model`` on decoded images."""
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    probs = predict_probs(model, images, mean, std, batch_size, device)
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


def save_report(report: dict, out_dir: str, storage: StorageConfig | None = None) -> list[str]:
    """Write ``metrics.json`` and ``confusion_matrix.png`` under ``out_dir``; return their URIs."""
    from fpc_ray.plots import confusion_matrix_png
    from fpc_ray.storage import resolve

    out = resolve(out_dir, storage)
    out.makedirs()
    json_loc, png_loc = out.join("metrics.json"), out.join("confusion_matrix.png")
    json_loc.write_text(json.dumps(report, indent=2))
    png_loc.write_bytes(confusion_matrix_png(report["confusion_matrix"], report["class_names"],
                                             title=f"{report.get('split', '')} top-1 {report['top1']:.3f}"))
    return [json_loc.uri, png_loc.uri]


def summary_lines(report: dict) -> list[str]:
    """A human-readable summary of a classification report."""
    lines = [f"n={report['n']}  top1={report['top1']:.4f}  top2={report['top2']:.4f}  "
             f"macro_f1={report['macro_f1']:.4f}  ece={report['ece']:.4f}"]
    width = max(len(n) for n in report["per_class"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
                     f"{m['support']:7d}")
    return lines
