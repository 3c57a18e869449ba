"""Entrypoint for `ray job submit`: fine-tune on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/train.py \
        --config configs/multi-gpu.yaml --data s3://bucket/FETAL_PLANES_DB --output s3://bucket/models/run-01

Takes exactly the flags of `fpc-ray train` (`--data` may be repeated: each dataset is split by its own
patients, then the splits are joined). Inside a Ray job, RAY_ADDRESS is set, so training
joins the job's cluster instead of starting a local one.
"""

import sys

from fpc_ray.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    main()
