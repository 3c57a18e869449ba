"""Matplotlib figures rendered to PNG bytes (headless; no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm, class_names: list[str], title: str = "") -> bytes:
    """A row-normalised confusion matrix with raw counts written in the cells."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.1 * len(class_names) + 2, 1.0 * len(class_names) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    if title:
        ax.set_title(title)
    return _png(fig)


def training_curves_png(history: list[dict]) -> bytes:
    """Loss (train, val) and validation top-1/top-2 per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    right.plot(epochs, [h["val_top1"] for h in history], marker="o", label="val top-1")
    right.plot(epochs, [h["val_top2"] for h in history], marker="o", label="val top-2")
    right.set_ylim(0, 1.02)
    right.set_xlabel("epoch")
    right.set_title("validation accuracy")
    right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def _reliability_panel(ax, bins: list[dict], title: str) -> None:
    used = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    ax.bar([b["lo"] for b in used], [b["accuracy"] for b in used], width=width, align="edge",
           edgecolor="black", alpha=0.75, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")


def reliability_png(bins: list[dict], ece: float | None = None, *, uncalibrated_bins: list[dict] | None = None,
                    uncalibrated_ece: float | None = None, temperature: float | None = None) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal of perfect calibration.

    With ``uncalibrated_bins``, two panels: before temperature scaling (T=1) and after (``temperature``).
    """
    def title(what: str, value: float | None) -> str:
        return what + (f" (ECE {value:.3f})" if value is not None else "")

    if uncalibrated_bins is None:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        _reliability_panel(ax, bins, title("reliability", ece))
        return _png(fig)
    fig, (before, after) = plt.subplots(1, 2, figsize=(9.2, 4.2))
    _reliability_panel(before, uncalibrated_bins, title("before calibration, T=1", uncalibrated_ece))
    t = f"T={temperature:.3g}" if temperature is not None else "calibrated"
    _reliability_panel(after, bins, title(f"after calibration, {t}", ece))
    return _png(fig)


def bar_png(labels: list[str], values: list[float], title: str, xlabel: str = "") -> bytes:
    """A horizontal bar chart (long class names stay readable)."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(labels), 2) + 1.2))
    ax.barh(range(len(labels)), values, color="#4C72B0")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:g}", va="center", fontsize=9)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    return _png(fig)


def histogram_png(values, title: str, xlabel: str, bins: int = 20, value_range=(0.0, 1.0)) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(np.asarray(values, dtype=float), bins=bins, range=value_range, color="#55A868", edgecolor="black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("frames")
    ax.grid(alpha=0.3)
    return _png(fig)
