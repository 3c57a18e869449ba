"""Entrypoint for `ray job submit`: a hyperparameter search on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config configs/tune.yaml --data s3://bucket/FETAL_PLANES_DB --output s3://bucket/searches/s-01 \
        --max-concurrent 4 --workers-per-trial 2 --use-gpu

Takes exactly the flags of `fpc-ray tune` (`--data` may be repeated: each dataset is split by its own
patients, then the splits are joined); resubmit with `--resume` to continue an interrupted
search. Inside a Ray job, RAY_ADDRESS is set, so the search joins the job's cluster.
"""

import sys

from fpc_ray.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "tune", *sys.argv[1:]]
    main()
