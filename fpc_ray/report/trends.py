"""The trends page of a labelling output: every committed run, night over night.

Class mix, confidence, low-confidence share, error rate and the drift scores (with their warn
and alert bands) per run, model promotions marked where the model changed, the newest run's
verdict as text, and links to the runs' own pages where a run folder holds one (``report.html``).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import quote

import numpy as np

from fpc_ray.config import DriftConfig, StorageConfig
from fpc_ray.drift.assess import ALERT, WARN, Assessment, class_names
from fpc_ray.drift.check import check_drift
from fpc_ray.drift.table import run_records
from fpc_ray.report import trend_plots
from fpc_ray.report.page import esc, img, page, section, table
from fpc_ray.storage import is_remote

RUN_REPORT = "report.html"  # a run's own page, linked from the trends page where its folder holds one


def _promotions(records: list[dict]) -> dict[int, str]:
    return {i: r["model_version"] for i, r in enumerate(records) if r["model_changed"]}


def _report_link(a: Assessment, output: Path | None) -> str | None:
    """A relative link to the run's own page: from the page's folder for a local output, else
    relative to the prefix (a page published beside the runs)."""
    run_dir = a.run.folder
    if not run_dir.join(RUN_REPORT).exists():
        return None
    if output is not None and not is_remote(run_dir.uri):
        link = Path(os.path.relpath(Path(run_dir.path) / RUN_REPORT, output.resolve().parent)).as_posix()
    else:
        link = posixpath.join(posixpath.basename(run_dir.path.rstrip("/")), RUN_REPORT)
    return quote(link, safe="/=")  # a folder named by hand may hold '#', '?', '%' or '\\'


def _verdict(newest: Assessment, line: str) -> str:
    colour = {"alert": "#b3261e", "warn": "#8a6100"}.get(newest.level, "#1d6b35")
    return section("Newest run", f'<p style="font-size:16px;color:{colour}"><strong>'
                   f'{esc(newest.level.upper())}</strong> · <code>{esc(line)}</code></p>')


def _runs_table(records: list[dict], assessments: list[Assessment], output: Path | None) -> str:
    rows = []
    for r, a in zip(records, assessments, strict=True):
        link = _report_link(a, output)
        run = f'<a href="{esc(link)}">{esc(r["run_id"])}</a>' if link else esc(r["run_id"])
        cells = [r["model_version"] + (" (new)" if r["model_changed"] else ""), r["stats"], r["labelled"],
                 r["error_rate"], r["mean_confidence"], r["low_confidence_share"],
                 r["scores"].get("class_psi"), r["scores"].get("confidence_psi"), r["scores"].get("chi2_p"),
                 r["level"], "; ".join(r["reasons"] + ([r["model_note"]] if r["model_note"] else []))]
        rows.append(f"<tr><td>{run}</td>" + "".join(
            f'<td class="num">{v:.4g}</td>' if isinstance(v, float) else f"<td>{esc('—' if v is None else v)}</td>"
            for v in cells) + "</tr>")
    head = ["run", "model", "stats", "frames", "error rate", "mean conf", "low conf", "class PSI", "conf PSI",
            "chi² p", "level", "what moved"]
    return section("Runs", "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                   + "".join(rows) + "</table>")


def trends_report(prefix: str, storage: StorageConfig, cfg: DriftConfig, output: Path | None = None,
                  hide_sources: bool = False) -> str:
    """The page of every committed run under ``prefix``; ``output`` (where the page goes) makes
    the links to the runs' pages relative to it."""
    check = check_drift(prefix, cfg, storage)
    records, assessments = run_records(check.assessments), check.assessments
    ids, promotions = [r["run_id"] for r in records], _promotions(records)
    names = class_names([a.run for a in assessments])
    shares = np.array([[r["class_mix"].get(n, 0.0) for n in names] for r in records])
    flagged = [r for r in records if r["level"] in (ALERT, WARN)]
    sections = [
        _verdict(check.newest, check.line()),
        section("Class mix", img(trend_plots.class_mix_png(ids, names, shares, promotions), "class mix per run")),
        section("Confidence", img(trend_plots.series_png(
            ids, {"mean top-1 confidence": [r["mean_confidence"] for r in records],
                  f"share below {cfg.low_confidence:g}": [r["low_confidence_share"] for r in records]},
            "confidence per run", promotions, ylim=(0, 1.02)), "confidence per run")),
        section("Errors", img(trend_plots.series_png(ids, {"error rate": [r["error_rate"] for r in records]},
                                                     "error rows per run", promotions), "error rate per run")),
        section("Drift scores", img(trend_plots.series_png(
            ids, {"class-mix PSI": [r["scores"].get("class_psi") for r in records],
                  "confidence PSI": [r["scores"].get("confidence_psi") for r in records]},
            f"PSI against the reference (the {cfg.reference_window} runs before, same model)", promotions,
            bands=(cfg.psi_warn, cfg.psi_alert)), "drift scores per run"),
            table(["run", "level", "what moved"],
                  [(r["run_id"], r["level"], "; ".join(r["reasons"])) for r in flagged]) if flagged else
            "<p>No run reached the warn level.</p>"),
        _runs_table(records, assessments, output),
    ]
    where = "a labelling output (not shown)" if hide_sources else prefix
    return page(f"fpc-ray trends: {len(records)} labelling runs", where, sections)
