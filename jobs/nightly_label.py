"""Nightly labelling, for `ray job submit` or a scheduler.

    ray job submit --working-dir . -- python jobs/nightly_label.py \
        --model s3://models/production.json --archive s3://archive --output s3://labels \
        [--date 2026-11-24] [--lookback-days 3] [--drift] [--config FILE] [--set drift.psi_alert=0.3 ...]

Labels ARCHIVE/YYYY/MM/DD/ (default: yesterday, UTC) and the ``--lookback-days`` days before it
into OUTPUT as run ``nightly-YYYY-MM-DD``. Incremental skipping labels only what no committed
run holds, so looking back costs a listing, and it catches objects that landed in a day's
folder after that day was committed, and the whole of a night that failed. Missing day folders
are skipped. With ``--drift``, once the night's run is committed (now, or by an earlier try),
``fpc-ray drift OUTPUT --fail-on-drift`` runs on OUTPUT: one ``drift: ...`` line, and exit 3
when that run is at the alert level, with the thresholds of ``--config`` and ``--set`` (read, and
checked, before labelling starts; the storage section applies to the whole job). Exit codes:
0 committed (or nothing to do), 1 an outage or a concurrent run (run it again), 2 a mistake in
the arguments, config, model or locations, 3 drift; every error is one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from fpc_ray.config import CAM_METHODS


def day_prefix(archive: str, day: dt.date) -> str:
    """ARCHIVE/YYYY/MM/DD/ for a local path or an s3:// URI."""
    return f"{archive.rstrip('/')}/{day:%Y/%m/%d}/"


def day_prefixes(archive: str, day: dt.date, lookback_days: int) -> list[str]:
    """The day's folder first, then the ``lookback_days`` days before it, newest first."""
    return [day_prefix(archive, day - dt.timedelta(days=k)) for k in range(lookback_days + 1)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model bundle or promotion pointer (e.g. s3://bucket/models/production.json)")
    parser.add_argument("--archive", required=True, help="archive root holding YYYY/MM/DD/ folders")
    parser.add_argument("--output", required=True, help="labelling output prefix")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=None,
                        help="YYYY-MM-DD to label (default: yesterday, UTC)")
    parser.add_argument("--lookback-days", type=int, default=3,
                        help="also label what is new in this many days' folders before --date (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="predictor actors")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cam", default="gradcam", choices=CAM_METHODS)
    parser.add_argument("--drift", action="store_true",
                        help="after the run commits, compare it with the runs before it (fpc-ray drift "
                             "--fail-on-drift, thresholds from the config's drift section): "
                             "exit 3 with one line when it drifted")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML config file (as the CLI's --config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value, e.g. drift.psi_alert=0.3 (repeatable)")
    return parser


def drift_check(output: str, run_id: str, cfg, echo=print) -> int:
    """The check of ``fpc-ray drift OUTPUT --fail-on-drift`` on the night's run (the newest,
    unless an older date was labelled) with ``cfg``'s drift thresholds: its one line, and
    EXIT_DRIFT at the alert level."""
    from fpc_ray.drift.assess import ALERT, alert_line
    from fpc_ray.drift.check import EXIT_DRIFT, check_drift

    night = next(a for a in check_drift(output, cfg.drift, cfg.storage).assessments if a.run.run_id == run_id)
    echo(alert_line(night))
    return EXIT_DRIFT if night.level == ALERT else 0


def run(args: argparse.Namespace, echo=print) -> int:
    """Label the night; raises UserError / RunFailed for the caller to turn into one line."""
    from fpc_ray.config import load_config
    from fpc_ray.errors import UserError
    from fpc_ray.label.pipeline import LabelOptions, run_labelling
    from fpc_ray.label.runs import SUCCESS
    from fpc_ray.storage import resolve

    if args.lookback_days < 0:
        raise UserError(f"--lookback-days {args.lookback_days}: must be 0 or more")
    day = args.date or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    run_id = f"nightly-{day.isoformat()}"
    cfg = load_config(args.config, args.overrides)
    storage = cfg.storage
    if resolve(f"{args.output.rstrip('/')}/run={run_id}/{SUCCESS}", storage).exists():
        echo(f"run {run_id} is already committed under {args.output}; nothing to do")
        # A retry of a job that exited 3 (drift) alerts again rather than succeed.
        return drift_check(args.output, run_id, cfg, echo) if args.drift else 0
    if not resolve(args.archive, storage).exists():
        raise UserError(f"{args.archive}: no such archive")
    prefixes = [p for p in day_prefixes(args.archive, day, args.lookback_days) if resolve(p, storage).exists()]
    if not prefixes:
        echo(f"run {run_id}: no day folders under {args.archive} from {day - dt.timedelta(days=args.lookback_days)} "
             f"to {day}; nothing to do")
        return 0
    opts = LabelOptions(run_id=run_id, workers=args.workers, use_gpu=args.use_gpu, cam=args.cam)
    summary = run_labelling(args.model, prefixes, args.output, opts, storage, echo=echo)
    echo(f"committed {summary['output']}: {summary['objects']['labelled']} objects from {len(prefixes)} day "
         f"folder(s), {summary['rows']} rows, {summary['labelled']} labelled, {summary['errors']} errors")
    return drift_check(args.output, run_id, cfg, echo) if args.drift else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits 2 with its own one-line usage error

    from fpc_ray.errors import run_job

    return run_job(run, args)


if __name__ == "__main__":
    sys.exit(main())
