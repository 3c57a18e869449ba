"""Shared fixtures: a phantom dataset, an embedded S3 server and a local Ray cluster."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# No request may leave the machine: AWS metadata lookups would hang without a network.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> str:
    """A small phantom FETAL_PLANES_DB (16 images per class, 192x144)."""
    from fpc_ray.data.synth import synthesize

    out = tmp_path_factory.mktemp("phantom")
    synthesize(str(out), per_class=16, seed=3, width=192, height=144)
    return str(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback with a ``test`` bucket; the AWS variables point at it."""
    from fpc_ray.devtools.s3server import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.create_bucket("test")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with 2 CPUs, shared by a test module."""
    import ray

    if ray.is_initialized():  # a cluster another module's in-process run left behind
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield
    ray.shutdown()
