"""Drift scores between two distributions given as counts over the same categories (classes, or
the bins of a histogram).

PSI, the population stability index, is ``sum((c - r) * ln(c / r))`` over the categories, with
``c`` and ``r`` the current and reference shares. An empty category would make it infinite, so
every share is floored at PSI_EPSILON (an empty bin counts as one frame in ten thousand) and the
shares renormalised; categories empty on both sides carry no information and are left out. The
usual reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one.

The chi-square test asks whether the current run's class counts could be a sample of the
reference's class shares: a small p-value means the mix moved by more than sampling explains.
It treats the reference shares as exact, so with tens of thousands of frames it finds even
negligible moves significant: :mod:`fpc_ray.drift.assess` pairs it with PSI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PSI_EPSILON = 1e-4


def _shares(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Floored, renormalised shares of both count vectors over the categories either one holds."""
    keep = (reference > 0) | (current > 0)
    ref, cur = (np.maximum(v[keep] / v.sum(), PSI_EPSILON) for v in (reference, current))
    return ref / ref.sum(), cur / cur.sum()


def _checked(reference, current) -> tuple[np.ndarray, np.ndarray]:
    ref, cur = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"counts over different categories: {ref.shape} and {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0 or (ref < 0).any() or (cur < 0).any():
        raise ValueError("each side needs non-negative counts with at least one observation")
    return ref, cur


def psi(reference, current) -> float:
    """The population stability index of ``current`` counts against ``reference`` counts."""
    ref, cur = _shares(*_checked(reference, current))
    return float(np.sum((cur - ref) * np.log(cur / ref)))


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    dof: int
    p_value: float


def chi_square(reference, current) -> ChiSquare:
    """Pearson's goodness-of-fit test of ``current`` counts against ``reference`` shares.

    Expected counts are the current total times the reference shares (floored like PSI's, so a
    category the reference never saw is a large term rather than a division by zero).
    """
    from scipy.stats import chi2  # scipy comes with albumentations; imported here, where it is used

    ref, cur = _checked(reference, current)
    keep = (ref > 0) | (cur > 0)
    shares, _ = _shares(ref, cur)
    observed = cur[keep]
    expected = observed.sum() * shares
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    dof = int(keep.sum()) - 1
    p_value = float(chi2.sf(statistic, dof)) if dof > 0 else 1.0
    return ChiSquare(statistic, dof, p_value)
