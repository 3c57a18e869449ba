"""Entrypoint for `ray job submit`: the retraining loop (train from production, compare, promote).

    ray job submit --working-dir . -- python jobs/retrain.py \
        --config configs/multi-gpu.yaml --data s3://bucket/FETAL_PLANES_DB [--data s3://bucket/reviewed/batch-01] \
        --pointer s3://bucket/models/production.json --candidates s3://bucket/models/candidates --margin 0.01

Takes exactly the flags of `fpc-ray retrain`; `--data` may be repeated (each dataset is split by its
own patients, the splits are joined, and both models are scored overall and per dataset). The
nightly labelling reads the same pointer (`--model s3://bucket/models/production.json`), so a
promotion reaches it the next night.
"""

import sys

from fpc_ray.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "retrain", *sys.argv[1:]]
    main()
