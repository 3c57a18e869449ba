"""The trends page's figures: one run per position on the x axis, model promotions marked."""

from __future__ import annotations

import numpy as np

from fpc_ray.errors import printable
from fpc_ray.plots import _png, plt  # plots picks the headless backend before pyplot loads

# Run ids are folder names and model versions and class names come from cards: text from outside.
# matplotlib reads "$...$" in text as math and fails the whole figure on one it cannot parse
# (a run folder "run=night$\frac$" committed by hand), so every such text is drawn literally.
LITERAL = {"parse_math": False}


def _runs_axis(ax, run_ids: list[str], promotions: dict[int, str]) -> None:
    """Run ids as ticks; a dashed line and the new model's version where the model changed."""
    ax.set_xticks(range(len(run_ids)), [printable(r) for r in run_ids], rotation=35, ha="right", fontsize=8, **LITERAL)
    ax.set_xlim(-0.6, len(run_ids) - 0.4)
    for i, version in promotions.items():
        ax.axvline(i - 0.5, color="#7b3fa0", linestyle="--", linewidth=1.2)
        ax.text(i - 0.45, 0.98, f"model {version}", transform=ax.get_xaxis_transform(), color="#7b3fa0",
                fontsize=8, va="top", **LITERAL)
    ax.grid(axis="y", alpha=0.3)


def _legend(ax, **kwargs) -> None:
    """The legend, its entries (class names from the model card) drawn literally."""
    for text in ax.legend(**kwargs).get_texts():
        text.set_parse_math(False)


def class_mix_png(run_ids: list[str], names: list[str], shares: np.ndarray, promotions: dict[int, str]) -> bytes:
    """Stacked bars: the share of each class among a run's labelled frames (``shares`` is
    runs x classes)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(run_ids) + 3), 3.8))
    bottom = np.zeros(len(run_ids))
    colors = plt.get_cmap("tab10").colors
    for j, name in enumerate(names):
        ax.bar(range(len(run_ids)), shares[:, j], bottom=bottom, label=name, color=colors[j % len(colors)])
        bottom += shares[:, j]
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("share of labelled frames")
    ax.set_title("class mix per run")
    _legend(ax, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    _runs_axis(ax, run_ids, promotions)
    return _png(fig)


def series_png(run_ids: list[str], series: dict[str, list[float | None]], title: str,
               promotions: dict[int, str], bands: tuple[float, float] | None = None,
               ylim: tuple[float, float] | None = None) -> bytes:
    """Lines over the runs (None: no value for that run); ``bands`` shades warn and alert levels."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(run_ids) + 3), 3.2))
    x = np.arange(len(run_ids))
    for label, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ax.plot(x, y, marker="o", label=label)
    if bands is not None:
        warn, alert = bands
        top = max(alert * 1.6, np.nanmax([v for vs in series.values() for v in vs if v is not None] or [0]) * 1.1)
        ax.axhspan(warn, alert, color="#f4c542", alpha=0.25, label=f"warn ({warn:g})")
        ax.axhspan(alert, top, color="#e0483e", alpha=0.18, label=f"alert ({alert:g})")
        ax.set_ylim(0, top)
    elif ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    _legend(ax, fontsize=8, loc="upper left")
    _runs_axis(ax, run_ids, promotions)
    return _png(fig)
