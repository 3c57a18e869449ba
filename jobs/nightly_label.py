"""Nightly labelling, for `ray job submit` or a scheduler.

    ray job submit --working-dir . -- python jobs/nightly_label.py \
        --model s3://models/production --archive s3://archive --output s3://labels [--date 2026-11-24]

Labels ARCHIVE/YYYY/MM/DD/ (default: yesterday, UTC) into OUTPUT as run `nightly-YYYY-MM-DD`.
Exits 0 when the run committed, non-zero otherwise; a rerun for the same date after a crash
labels exactly what the crashed attempt did not commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def day_prefix(archive: str, day: dt.date) -> str:
    """ARCHIVE/YYYY/MM/DD/ for a local path or an s3:// URI."""
    return f"{archive.rstrip('/')}/{day:%Y/%m/%d}/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model bundle or promotion pointer (e.g. s3://bucket/models/production.json)")
    parser.add_argument("--archive", required=True, help="archive root holding YYYY/MM/DD/ folders")
    parser.add_argument("--output", required=True, help="labelling output prefix")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=None,
                        help="YYYY-MM-DD to label (default: yesterday, UTC)")
    parser.add_argument("--workers", type=int, default=1, help="predictor actors")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cam", default="gradcam", choices=["gradcam", "gradcam++", "eigencam", "none"])
    args = parser.parse_args(argv)
    day = args.date or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))

    from fpc_ray.cli import main as cli_main
    from fpc_ray.label.pipeline import SUCCESS
    from fpc_ray.storage import resolve

    run_id = f"nightly-{day.isoformat()}"
    if resolve(f"{args.output.rstrip('/')}/run={run_id}/{SUCCESS}").exists():
        print(f"run {run_id} is already committed under {args.output}; nothing to do")
        return 0

    sys.argv = ["fpc-ray", "label", "--model", args.model, "--input", day_prefix(args.archive, day),
                "--output", args.output, "--run-id", run_id,
                "--workers", str(args.workers), "--cam", args.cam]
    if args.use_gpu:
        sys.argv.append("--use-gpu")
    cli_main()  # exits with the CLI's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
