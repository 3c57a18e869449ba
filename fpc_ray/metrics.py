"""Classification metrics from predicted probabilities, for ``fpc-ray evaluate`` and the test report
in every bundle (training's validation sums its own top-1/top-2 counts, to all-reduce them across
workers)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest probabilities."""
    if len(labels) == 0:
        return float("nan")
    topk = np.argsort(-probs, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top-1 prediction."""
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    """Per-bin confidence, accuracy and count, for reliability diagrams."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        out.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(mask.sum()),
            "confidence": float(conf[mask].mean()) if mask.any() else None,
            "accuracy": float(correct[mask].mean()) if mask.any() else None,
        })
    return out


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1/top-2, macro-F1, per-class precision/recall/F1/support, confusion matrix, ECE.

    Args:
        probs: N x C probabilities in ``class_names`` order.
        labels: N true class indices.
        class_names: the class order.

    Returns:
        A JSON-ready dict with keys ``top1``, ``top2``, ``macro_f1``, ``per_class``,
        ``confusion_matrix``, ``ece``, ``reliability``, ``n``, ``class_names``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    pred = probs.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    cm = confusion_matrix(pred, labels, num_classes)
    per_class, f1s = {}, []
    for c, name in enumerate(class_names):
        tp = cm[c, c]
        support = int(cm[c].sum())
        predicted = int(cm[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": support}
        if support:
            f1s.append(f1)
    return {
        "n": int(len(labels)),
        "top1": topk_accuracy(probs, labels, 1),
        "top2": topk_accuracy(probs, labels, min(2, num_classes)),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "ece": expected_calibration_error(probs, labels),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
        "reliability": reliability_bins(probs, labels),
    }
