"""``fpc-ray report``: one self-contained HTML page for a model bundle or a labelling run."""

from __future__ import annotations

from fpc_ray.bundle import CARD_FILE
from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.storage import resolve


def build_report(target: str, storage: StorageConfig, hide_sources: bool = False) -> tuple[str, str]:
    """(kind, html) for a bundle, a promotion pointer or a committed run folder (``run=<id>/``);
    ``hide_sources`` puts pseudonyms in place of source URIs, for pages to share."""
    from fpc_ray.label.runs import SUCCESS

    loc = resolve(target, storage)
    if str(target).rstrip("/").endswith(".json") or loc.join(CARD_FILE).exists():
        from fpc_ray.report.bundle_report import bundle_report

        return "model", bundle_report(target, storage, hide_sources)
    if loc.join(SUCCESS).exists():
        from fpc_ray.report.run_report import run_report

        return "run", run_report(loc, storage, hide_sources)
    if loc.exists():
        raise UserError(f"{target}: not a model bundle (no {CARD_FILE}) or a committed labelling run "
                        f"(no {SUCCESS}); a run is OUTPUT/run=<id>/")
    raise UserError(f"{target}: no such bundle or run")
