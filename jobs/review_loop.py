"""The review loop, for `ray job submit` or a scheduler: two steps, each its own job.

After the nightly labelling run commits, a review batch of its least certain frames:

    ray job submit --working-dir . -- python jobs/review_loop.py export \
        --labels s3://labels --batches s3://review/batches --n 200 [--strategy least-confident]

When reviewers' answers for a batch arrive (Label Studio's JSON export, or the filled tasks.csv):
import them into DATASETS/<batch name>/, then retrain from production on the base data plus every
reviewed dataset; the pointer moves only on promotion:

    ray job submit --working-dir . -- python jobs/review_loop.py ingest \
        --annotations s3://review/answers/20261126T031500Z.json --batch s3://review/batches/20261126T031500Z \
        --datasets s3://review/datasets --base-data s3://datasets/FETAL_PLANES_DB \
        --pointer s3://models/production.json --candidates s3://models/candidates [--config FILE]

Exit codes: 0 done (promoted or refused), 1 an outage or a concurrent change (run it again),
2 a mistake in the arguments, a bad annotation export (nothing written) or bad locations.
"""

from __future__ import annotations

import argparse
import sys

from fpc_ray.review import Strategy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    export = steps.add_parser("export", help="a review batch from the committed runs under --labels")
    export.add_argument("--labels", required=True, help="labelling output prefix (its committed runs)")
    export.add_argument("--batches", required=True, help="prefix the batches sit side by side under")
    export.add_argument("--n", type=int, default=200, help="frames per batch (default 200)")
    export.add_argument("--strategy", default=Strategy.least_confident.value, choices=[s.value for s in Strategy])
    export.add_argument("--per-class", type=int, default=None, help="K per predicted class (per-class strategy)")
    export.add_argument("--seed", type=int, default=0)
    ingest = steps.add_parser("ingest", help="import a batch's answers, then retrain on base + reviewed data")
    ingest.add_argument("--annotations", required=True, help="Label Studio JSON export or filled tasks.csv")
    ingest.add_argument("--batch", required=True, help="the review batch the answers are for")
    ingest.add_argument("--datasets", required=True, help="prefix the reviewed datasets sit side by side under")
    ingest.add_argument("--base-data", required=True, action="append", help="base dataset (repeatable)")
    ingest.add_argument("--pointer", required=True, help="promotion pointer, e.g. s3://models/production.json")
    ingest.add_argument("--candidates", required=True, help="prefix for candidate bundles")
    ingest.add_argument("--margin", type=float, default=0.01)
    ingest.add_argument("--test-fraction", type=float, default=0.2, help="studies of the batch kept for test")
    ingest.add_argument("--config", default=None, help="training config YAML (as fpc-ray retrain --config)")
    ingest.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    return parser


def run(args: argparse.Namespace, echo=print) -> int:
    from fpc_ray.config import StorageConfig, load_config
    from fpc_ray.errors import UserError
    from fpc_ray.label.runs import check_run_id
    from fpc_ray.review.export import ExportOptions
    from fpc_ray.review.loop import export_night, ingest_answers

    if args.step == "export":
        if args.n < 1:
            raise UserError(f"--n {args.n}: must be 1 or more")
        opts = ExportOptions(n=args.n, strategy=Strategy(args.strategy), per_class=args.per_class, seed=args.seed)
        export_night(args.labels, args.batches, opts, StorageConfig(), echo)
        return 0
    # The batch's folder name names the reviewed dataset (DATASETS/<batch name>/): a safe name, as a run id.
    check_run_id(args.batch.rstrip("/").rsplit("/", 1)[-1], "--batch name")
    cfg = load_config(args.config, args.overrides)
    ingest_answers(args.annotations, args.batch, args.datasets, args.base_data, args.pointer, args.candidates,
                   cfg, args.margin, args.test_fraction, echo)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits 2 with its own one-line usage error

    from fpc_ray.errors import run_job

    return run_job(run, args)


if __name__ == "__main__":
    sys.exit(main())
