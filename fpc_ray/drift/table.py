"""What ``fpc-ray drift`` prints: one record per run (``--json``) or a plain text table."""

from __future__ import annotations

from fpc_ray.drift.assess import Assessment, class_names
from fpc_ray.errors import printable


def _share(counts: dict, total: int) -> dict[str, float]:
    return {k: round(v / total, 4) for k, v in counts.items()} if total else {}


def run_record(a: Assessment, previous_model: str | None) -> dict:
    """One run's line of the JSON output: what it holds, its scores, its level and reasons."""
    s = a.run.stats
    return {
        "run_id": a.run.run_id, "committed_at": a.run.committed_at, "model_version": a.run.model_version,
        "model_changed": previous_model is not None and previous_model != a.run.model_version,
        "stats": a.run.source, "rows": s["rows"], "labelled": s["labelled"], "errors": s["errors"],
        "error_rate": round(s["errors"] / s["rows"], 4) if s["rows"] else None,
        "mean_confidence": s["confidence"]["mean"], "low_confidence_share": s["low_confidence"]["share"],
        "class_mix": _share(s["by_class"], s["labelled"]),
        "input_kind_mix": _share(s["input_kind"], s["labelled"]),
        "reference": [r.run_id for r in a.reference], "level": a.level,
        "scores": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in a.scores.items()},
        "reasons": a.reasons, "model_note": a.model_note,
    }


def run_records(assessments: list[Assessment]) -> list[dict]:
    previous = [None] + [a.run.model_version for a in assessments[:-1]]
    return [run_record(a, p) for a, p in zip(assessments, previous, strict=True)]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _columns(rows: list[list[str]]) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]  # run ids are folder names: escape what a terminal obeys
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def text_table(records: list[dict], assessments: list[Assessment]) -> list[str]:
    """The scores table, then the class and input-kind mix of each run (percent of frames)."""
    head = ["run", "model", "stats", "frames", "errors", "mean conf", "low conf", "class PSI", "conf PSI",
            "chi2 p", "level"]
    rows = [head] + [[
        r["run_id"], (r["model_version"] or "-") + (" *" if r["model_changed"] else ""), r["stats"],
        str(r["labelled"]), _fmt(r["error_rate"], ".1%"), _fmt(r["mean_confidence"], ".3f"),
        _fmt(r["low_confidence_share"], ".1%"), _fmt(r["scores"].get("class_psi"), ".3f"),
        _fmt(r["scores"].get("confidence_psi"), ".3f"), _fmt(r["scores"].get("chi2_p"), ".1e"),
        r["level"].upper() if r["level"] == "alert" else r["level"]] for r in records]
    names = class_names([a.run for a in assessments])
    kinds = sorted({k for r in records for k in r["input_kind_mix"]})
    mix = [["run", *names, *(f"[{k}]" for k in kinds)]] + [
        [r["run_id"], *(_fmt(r["class_mix"].get(n), ".0%") for n in names),
         *(_fmt(r["input_kind_mix"].get(k), ".0%") for k in kinds)] for r in records]
    notes = [printable(f"{r['run_id']}: {'; '.join(r['reasons'])}") for r in records if r["reasons"]]
    notes += [printable(f"{r['run_id']}: {r['model_note']}") for r in records if r["model_note"]]
    return [*_columns(rows), "(* the model changed at this run; stats 'computed': the run predates "
            "recorded stats, they were computed from its Parquet)", "", "class mix [input kinds]:",
            *_columns(mix), *([""] + notes if notes else [])]
