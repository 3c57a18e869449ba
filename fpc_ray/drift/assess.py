"""Each run against its reference: scores, a level (ok, warn, alert) and what moved.

The reference of a run is by default the ``reference_window`` labelled runs before it of the
same model version, their counts pooled (a promotion changes the labels and confidences
wholesale: comparing across models would flag every promotion as drift). Where no run before
used that model (the first nights of a new one), the runs before it of any model are used and
the level is capped at *warn*, the line saying the comparison crossed models. With a fixed
reference run, that one run for every other (capped the same way where its model differs).

A run or a pooled reference of fewer than ``min_frames`` labelled frames is *too few frames*,
never a warning or an alert: PSI's sampling noise on a few dozen frames reaches the alert level.
Otherwise a run is an *alert* when a PSI (class mix or confidence histogram) reaches
``psi_alert``, or when the class mix's chi-square p-value is below ``chi2_p_alert`` on at least
``chi2_min_frames`` frames *and* its PSI reaches ``psi_warn`` (significant and not negligible:
on a large night the test alone would flag any wobble); a *warning* when a PSI reaches
``psi_warn``. Whatever its frames or model, a run whose error rate is ``error_rate_alert`` or
more above its reference's, significantly so (binomial test, p below ``chi2_p_alert``), is an
alert: a night where every object fails has no frames to score but must not pass quietly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fpc_ray.config import DriftConfig
from fpc_ray.drift.history import RunRecord
from fpc_ray.drift.scores import chi_square, psi
from fpc_ray.errors import UserError, printable

FIRST, REFERENCE, NO_FRAMES, TOO_FEW = "first run", "reference", "no frames", "too few frames"
UNSCORED = (FIRST, REFERENCE, NO_FRAMES, TOO_FEW)
OK, WARN, ALERT = "ok", "warn", "alert"
MOVERS = 3  # the classes named in an alert line
ERROR_KINDS = 3  # the error kinds named in an error-rate alert line


@dataclass
class Assessment:
    """One run's comparison with its reference (``level`` is one of UNSCORED when there is
    nothing to compare)."""

    run: RunRecord
    reference: list[RunRecord]
    level: str
    scores: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    model_note: str | None = None


def class_counts(records: list[RunRecord], names: list[str]) -> np.ndarray:
    return np.array([sum(r.stats["by_class"].get(n, 0) for r in records) for n in names], dtype=np.float64)


def class_names(records: list[RunRecord]) -> list[str]:
    """Every class any of the runs names, in the model's order where the stats give it."""
    names: list[str] = []
    for r in records:
        for n in [*(r.stats.get("class_names") or []), *r.stats["by_class"]]:
            if n not in names:
                names.append(n)
    return names


def _confidence_counts(records: list[RunRecord]) -> np.ndarray:
    return np.sum([r.stats["confidence"]["counts"] for r in records], axis=0).astype(np.float64)


def _mean_confidence(records: list[RunRecord]) -> float:
    hist = [(r.stats["confidence"]["mean"], r.stats["labelled"]) for r in records if r.stats["labelled"]]
    return sum(m * n for m, n in hist) / sum(n for _, n in hist)


def _class_reason(ref: np.ndarray, cur: np.ndarray, names: list[str], value: float, level: str) -> str:
    ref_share, cur_share = ref / ref.sum(), cur / cur.sum()
    order = np.argsort(-np.abs(cur_share - ref_share))[:MOVERS]
    moved = ", ".join(f"{names[i]} {ref_share[i]:.2f} -> {cur_share[i]:.2f}" for i in order)
    return f"class-mix PSI {value:.2f} ({level}): {moved}"


def _score(run: RunRecord, reference: list[RunRecord], cfg: DriftConfig) -> Assessment:
    names = class_names([run, *reference])
    ref, cur = class_counts(reference, names), class_counts([run], names)
    conf_ref, conf_cur = _confidence_counts(reference), _confidence_counts([run])
    test = chi_square(ref, cur)
    scores = {"class_psi": psi(ref, cur), "confidence_psi": psi(conf_ref, conf_cur),
              "chi2_statistic": test.statistic, "chi2_dof": test.dof,
              "chi2_p": test.p_value if cur.sum() >= cfg.chi2_min_frames else None}
    reasons, level = [], OK
    for bound, name in ((cfg.psi_alert, ALERT), (cfg.psi_warn, WARN)):
        if scores["class_psi"] >= bound:
            reasons.append(_class_reason(ref, cur, names, scores["class_psi"], f"{name} {bound:g}"))
        if scores["confidence_psi"] >= bound:
            reasons.append(f"confidence PSI {scores['confidence_psi']:.2f} ({name} {bound:g}): mean "
                           f"{_mean_confidence(reference):.2f} -> {_mean_confidence([run]):.2f}")
        if reasons:
            level = name
            break
    p = scores["chi2_p"]
    if level != ALERT and p is not None and p < cfg.chi2_p_alert and scores["class_psi"] >= cfg.psi_warn:
        level = ALERT
        reasons.append(f"class-mix chi-square p {p:.1e} (alert below {cfg.chi2_p_alert:g})")
    return Assessment(run, reference, level, scores, reasons)


def model_note(run: RunRecord, history: list[RunRecord], reference: list[RunRecord]) -> str | None:
    """``model changed A -> B at this run`` (or ``at run X``) where the reference holds runs of
    another model than ``run``'s, saying the comparison does not alert; None where it does not."""
    if all(r.model_version == run.model_version for r in reference):
        return None
    at = history.index(run)
    while at > 0 and history[at - 1].model_version == run.model_version:
        at -= 1
    before = history[at - 1].model_version if at > 0 else reference[-1].model_version
    where = "this run" if history[at] is run else f"run {history[at].run_id}"
    return f"model changed {before} -> {run.model_version} at {where}: compared across models, not alerting"


def _reference_of(i: int, history: list[RunRecord], fixed: RunRecord | None, window: int) -> list[RunRecord]:
    """The fixed run, or the ``window`` labelled runs before run ``i`` of its model version (of
    any model where none before used it)."""
    if fixed is not None:
        return [] if history[i] is fixed else [fixed]
    before = [r for r in history[:i] if r.stats["labelled"]]
    same = [r for r in before if r.model_version == history[i].model_version]
    return (same or before)[-window:]


def _error_rule(a: Assessment, cfg: DriftConfig) -> None:
    """The error-rate alert: the run's error rows over its rows against the reference's, when the
    rise reaches ``error_rate_alert`` and a binomial test finds it beyond sampling."""
    from scipy.stats import binom

    rows, errors = a.run.stats["rows"], a.run.stats["errors"]
    ref_rows, ref_errors = (sum(r.stats[k] for r in a.reference) for k in ("rows", "errors"))
    if not rows or not ref_rows:
        return
    rate, ref_rate = errors / rows, ref_errors / ref_rows
    # The reference's rate smoothed by half an error, so a reference that never failed is not exact 0.
    p = float(binom.sf(errors - 1, rows, (ref_errors + 0.5) / (ref_rows + 1)))
    a.scores |= {"error_rate": rate, "reference_error_rate": ref_rate, "error_p": p}
    if rate - ref_rate >= cfg.error_rate_alert and p < cfg.chi2_p_alert:
        kinds = sorted(a.run.stats.get("errors_by_kind", {}).items(), key=lambda kv: -kv[1])[:ERROR_KINDS]
        a.level = ALERT
        a.reasons.append(f"error rate {rate:.1%} (reference {ref_rate:.1%}, alert +{cfg.error_rate_alert:.0%}): "
                         + ", ".join(f"{k} {n}" for k, n in kinds))


def _assess_run(run: RunRecord, reference: list[RunRecord], history: list[RunRecord], cfg: DriftConfig) -> Assessment:
    frames, ref_frames = run.stats["labelled"], sum(r.stats["labelled"] for r in reference)
    if not frames:
        done = Assessment(run, reference, NO_FRAMES)
    elif min(frames, ref_frames) < cfg.min_frames:
        done = Assessment(run, reference, TOO_FEW, reasons=[
            f"{frames} labelled frames, {ref_frames} in the reference: drift scores need {cfg.min_frames} in each"])
    else:
        done = _score(run, reference, cfg)
    done.model_note = model_note(run, history, reference)
    if done.model_note and done.level == ALERT:  # a promotion moves everything: not a data change
        done.level = WARN
    _error_rule(done, cfg)
    return done


def assess(history: list[RunRecord], cfg: DriftConfig, reference_run: str | None = None,
           window: int | None = None) -> list[Assessment]:
    """Every run of ``history`` (oldest first) against its reference.

    Raises:
        UserError: ``reference_run`` is not one of the runs, or has no labelled frames.
    """
    fixed = None
    if reference_run is not None:
        fixed = next((r for r in history if r.run_id == reference_run), None)
        if fixed is None:
            raise UserError(f"--reference {reference_run}: no such committed run; runs: "
                            f"{', '.join(r.run_id for r in history[-10:])}{' ...' if len(history) > 10 else ''}")
        if not fixed.stats["labelled"]:
            raise UserError(f"--reference {reference_run}: the run has no labelled frames to compare with")
    out = []
    for i, run in enumerate(history):
        reference = _reference_of(i, history, fixed, window or cfg.reference_window)
        if run is fixed:
            out.append(Assessment(run, [], REFERENCE))
        elif not reference and run.stats["labelled"]:
            out.append(Assessment(run, [], FIRST))
        else:
            out.append(_assess_run(run, reference, history, cfg))
    return out


def alert_line(a: Assessment) -> str:
    """One line: the run, its level and what moved (the nightly job's alert).

    Control characters are escaped: a run folder named by hand holds what its maker typed.
    """
    note = f"; {a.model_note}" if a.model_note else ""
    if a.level in UNSCORED:
        why = f" ({'; '.join(a.reasons)})" if a.reasons else ""
        return printable(f"drift: run {a.run.run_id}: {a.level}{why}, nothing to compare{note}")
    what = "; ".join(a.reasons) or (f"class-mix PSI {a.scores['class_psi']:.3f}, "
                                    f"confidence PSI {a.scores['confidence_psi']:.3f}")
    return printable(f"drift: run {a.run.run_id} {a.level}: {what}{note}")
