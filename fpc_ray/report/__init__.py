"""``fpc-ray report``: one self-contained HTML page for a model bundle, a labelling run or the
trends of a labelling output's runs."""

from __future__ import annotations

from pathlib import Path

from fpc_ray.bundle import CARD_FILE
from fpc_ray.config import DriftConfig, StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.storage import resolve


def build_report(target: str, storage: StorageConfig, hide_sources: bool = False, output: Path | None = None,
                 drift: DriftConfig | None = None) -> tuple[str, str]:
    """(kind, html) for a bundle, a promotion pointer, a committed run folder (``run=<id>/``) or
    a labelling output holding committed runs (its trends page, ``drift`` its thresholds);
    ``hide_sources`` puts pseudonyms in place of source URIs, for pages to share; ``output``,
    where the page goes, makes the trends page's links to run pages relative to it."""
    from fpc_ray.label.runs import SUCCESS, committed_runs

    loc = resolve(target, storage)
    if str(target).rstrip("/").endswith(".json") or loc.join(CARD_FILE).exists():
        from fpc_ray.report.bundle_report import bundle_report

        return "model", bundle_report(target, storage, hide_sources)
    if loc.join(SUCCESS).exists():
        from fpc_ray.report.run_report import run_report

        return "run", run_report(loc, storage, hide_sources)
    if committed_runs(loc):
        from fpc_ray.report.trends import trends_report

        return "trends", trends_report(target, storage, drift or DriftConfig(), output, hide_sources)
    if loc.exists():
        raise UserError(f"{target}: not a model bundle (no {CARD_FILE}), a committed labelling run "
                        f"(no {SUCCESS}; a run is OUTPUT/run=<id>/) or a labelling output holding "
                        "committed runs")
    raise UserError(f"{target}: no such bundle, run or labelling output")
