"""Shared fixtures: a phantom dataset, an embedded S3 server and one local Ray cluster."""

from __future__ import annotations

import os

import pytest

from fpc_ray.cluster import skip_update_checks

# The tests run commands in-process (typer's CliRunner), bypassing the CLI's main: albumentations
# must not ask PyPI for a newer version here or in the workers of the clusters this process starts.
skip_update_checks()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# No request may leave the machine: AWS metadata lookups would hang without a network.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray Train's controller polls its workers every 2 s, so every finished (or failed) worker group is
# noticed up to 2 s late: a few seconds per training run, tune trial and restart. Every driver,
# subprocess and local cluster the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Tests that start a cluster, a server or training (directly or through these fixtures) are the
# slow lane; `pytest -m "not slow"` runs the rest, the unit tests, in under a minute. Tests that
# start training or subprocesses without these fixtures carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {"ray_cluster", "ray_local", "s3_server", "trained_bundle"}
SLOW_MARKS = {"ray", "s3"}


def _is_slow(item) -> bool:
    if SLOW_FIXTURES & set(item.fixturenames) or any(item.get_closest_marker(m) for m in SLOW_MARKS):
        return True
    # A test parametrized onto "s3" starts the server through request.getfixturevalue, which
    # its fixture names do not show.
    params = getattr(item, "callspec", None)
    return params is not None and any(isinstance(v, str) and v == "s3" for v in params.params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> str:
    """A small phantom FETAL_PLANES_DB (16 images per class, 192x144)."""
    from fpc_ray.data.synth import synthesize

    out = tmp_path_factory.mktemp("phantom")
    synthesize(str(out), per_class=16, seed=3, width=192, height=144)
    return str(out)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, worker_id) -> dict:
    """One bundle trained in-process on phantom data, shared by every test that only needs *a*
    trained model (labelling, reports, CAMs, the CLI's evaluate): ``{"bundle", "data"}`` paths.
    Tests must not change it (copy it first).

    Under xdist the test processes share one: the first to ask trains it under a file lock in the
    run's common temporary folder, the others wait for it and read it (a training run is the most
    expensive fixture of the suite).

    Tests of training itself (Ray Train workers, resuming, retraining, the CLI's ``train``) still
    train their own. 64 px and four epochs: accurate on phantoms (the labelling tests check it).
    """
    from filelock import FileLock

    from tests.phantom import phantom_bundle

    if worker_id == "master":  # one test process: its own temporary folder
        root = tmp_path_factory.mktemp("trained")
        phantom_bundle(root, seed=5, epochs=4, per_class=20)
    else:  # the run's folder, above each process's own (unique to this run)
        root = tmp_path_factory.getbasetemp().parent / "trained"
        with FileLock(f"{root}.lock"):
            if not (root / "bundle" / "model.json").exists():
                phantom_bundle(root, seed=5, epochs=4, per_class=20)
    return {"bundle": str(root / "bundle"), "data": str(root / "data")}


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
    server.stop(grace=0)  # the session is over: nothing will read it again, so no 3 s of SIGTERM grace


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> str:
    """One local Ray cluster (2 CPUs) for every in-process Ray test of the session; yields its GCS
    address, which subprocess drivers join through ``RAY_ADDRESS``.

    Started once the AWS variables point at the embedded S3, so its workers inherit them; started
    by ``fpc_ray.cluster.init_ray``, as every fpc-ray command starts a local cluster. Starting it
    once saves a cluster start (5-10 s) per module.
    """
    import ray

    from fpc_ray.cluster import init_ray

    if ray.is_initialized():  # a cluster an in-process run started outside this fixture
        ray.shutdown()
    init_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(ray_cluster) -> str:
    """The session's local Ray cluster (2 CPUs), for a test module; yields its GCS address."""
    return ray_cluster
