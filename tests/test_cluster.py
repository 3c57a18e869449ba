"""A real 2-node Ray cluster on this machine: `ray job submit` runs the nightly job and training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.phantom import phantom_bundle

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The head's GCS port sits outside both nodes' worker port ranges (10002-19999 by default).
HEAD_PORT, DASHBOARD_PORT = 6391, 8276
TEMP_DIR = "/tmp/fpc-ray-2node"


def _env() -> dict:
    # Ray's job drivers run `python` from PATH: it must be this environment's.
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def _cluster_pids() -> list[int]:
    """This test's Ray processes: those whose command line names its temp dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if TEMP_DIR.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _stop_cluster() -> None:
    """Stop this test's two nodes only (`ray stop` would stop every Ray process on the machine):
    SIGTERM, up to 2 s to exit, then SIGKILL for what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _cluster_pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = _cluster_pids()


@pytest.fixture(scope="module")
def cluster():
    _stop_cluster()
    shutil.rmtree(TEMP_DIR, ignore_errors=True)
    head = _ray("start", "--head", f"--port={HEAD_PORT}", "--num-cpus=1", f"--temp-dir={TEMP_DIR}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                "--min-worker-port=10002", "--max-worker-port=10499", "--ray-client-server-port=6392",
                "--dashboard-agent-listen-port=52381", "--metrics-export-port=52382")
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        worker = _ray("start", f"--address=127.0.0.1:{HEAD_PORT}", "--num-cpus=1",
                      "--min-worker-port=10500", "--max-worker-port=10999",
                      "--dashboard-agent-listen-port=52383", "--metrics-export-port=52384")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = _ray("status", f"--address=127.0.0.1:{HEAD_PORT}")
            if status.stdout.count("node_") >= 2 or "2.0 CPU" in status.stdout or "0.0/2.0 CPU" in status.stdout:
                break
            time.sleep(1)
        yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        _stop_cluster()


def _submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    return _ray("job", "submit", f"--address={address}", "--working-dir", ".", "--", "python", *entrypoint,
                timeout=900)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    phantom_bundle(root, seed=4, epochs=1)
    return root


def test_nightly_job_submitted_to_a_two_node_cluster_commits_its_run(cluster, bundle, tmp_path):
    images = sorted((bundle / "data" / "Images").glob("*.png"))
    day, other = tmp_path / "archive" / "2026" / "11" / "24", tmp_path / "archive" / "2026" / "11" / "19"
    day.mkdir(parents=True)
    other.mkdir(parents=True)
    for image in images[:12]:
        shutil.copy(image, day / image.name)
    shutil.copy(images[12], other / images[12].name)  # beyond the job's 3-day look-back: not labelled
    out = tmp_path / "labels"
    done = _submit(cluster, "jobs/nightly_label.py", "--model", str(bundle / "bundle"),
                   "--archive", str(tmp_path / "archive"), "--output", str(out), "--date", "2026-11-24")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "run=nightly-2026-11-24" / "_SUCCESS.json").read_text())
    assert summary["objects"]["labelled"] == 12 and summary["rows"] == 12 and summary["errors"] == 0


def test_two_worker_training_job_is_placed_on_both_nodes(cluster, bundle, tmp_path):
    from ray.util.state import list_actors

    done = _submit(cluster, "jobs/train.py", "--data", str(bundle / "data"), "--output", str(tmp_path / "b"),
                   "--epochs", "1", "--image-size", "64", "--num-workers", "2",
                   "--set", "train.cpus_per_worker=1", "--set", "model.pretrained=none")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["training"]["num_workers"] == 2
    workers = list_actors(address=cluster, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    # One CPU per node and one CPU per worker: DDP only runs with a worker on each node.
    assert len({w.node_id for w in workers}) == 2, workers
