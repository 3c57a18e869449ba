"""Drift scores between two distributions given as counts over the same categories (classes, or
the bins of a histogram).

PSI, the population stability index, is ``sum((c - r) * ln(c / r))`` over the categories, with
``c`` and ``r`` the current and reference shares. An empty category would make it infinite, so
the shares are smoothed: SMOOTHING (half a frame, the Jeffreys prior) is added to every
category's count on both sides before normalising. A floor on the shares instead (one frame in
ten thousand) made each bin that one small run happened to leave empty add about ``share *
ln(share / 1e-4)``: two samples of 36 frames of the same run reached the alert level nine times
in ten. Categories empty on both sides carry no information and are left out. The usual
reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one.

The chi-square test asks whether the current run's and the reference's class counts could be
samples of one mix (Pearson's test of homogeneity on the 2 x classes table): a small p-value
means the mix moved by more than sampling explains, on either side. (A goodness-of-fit test
against the reference's shares, as if they were exact, halves the noise it allows when the
reference is no larger than the run: two samples of 150 frames of one mix were "significant"
one time in ten.) With tens of thousands of frames it still finds negligible moves
significant: :mod:`fpc_ray.drift.assess` pairs it with PSI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMOOTHING = 0.5  # pseudo-count per category and side (Jeffreys): an empty bin is half a frame


def _shares(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed shares of both count vectors over the categories either one holds."""
    keep = (reference > 0) | (current > 0)
    ref, cur = (v[keep] + SMOOTHING for v in (reference, current))
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
    """Pearson's chi-square test of homogeneity of ``reference`` and ``current`` counts (no
    continuity correction) over the categories either one holds."""
    from scipy.stats import chi2_contingency  # scipy comes with albumentations; imported where used

    ref, cur = _checked(reference, current)
    keep = (ref > 0) | (cur > 0)
    if keep.sum() < 2:
        return ChiSquare(0.0, 0, 1.0)
    test = chi2_contingency(np.vstack([ref[keep], cur[keep]]), correction=False)
    return ChiSquare(float(test.statistic), int(test.dof), float(test.pvalue))
