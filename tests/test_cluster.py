"""A real 2-node Ray cluster on this machine: `ray job submit` runs the nightly job and training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    # Ray's job drivers run `python` from PATH: it must be this environment's.
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def _free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on, from the kernel's ephemeral range (above Ray's default
    worker ports, 10002-19999, which other clusters on the machine may use)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cluster_pids(temp_dir: str) -> list[int]:
    """This test's Ray processes: those whose command line names its temp dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """Stop this test's two nodes only (`ray stop` would stop every Ray process on the machine):
    SIGTERM, up to 2 s to exit, then SIGKILL for what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = _cluster_pids(temp_dir)


def _wait_for_nodes(dashboard: str, n: int, timeout: float = 60) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    while True:
        alive = [x for x in list_nodes(address=dashboard, raise_on_missing_output=False) if x.state == "ALIVE"]
        if len(alive) >= n:
            return
        assert time.monotonic() < deadline, f"{len(alive)} of {n} nodes came up"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each, on free ports, with a temp dir of their own. Workers bind
    random ports (worker port range 0), so no port range is shared with another cluster."""
    # Ray's socket paths (temp dir + ~70 characters) must stay under AF_UNIX's 107 bytes: pytest's
    # own temp dirs, deeper still under parallel test workers, are too long.
    temp_dir = tempfile.mkdtemp(prefix="fpc-2node-", dir="/tmp")
    head_port, dashboard_port, client_port, *agent_ports = _free_ports(7)
    random_worker_ports = ("--min-worker-port=0", "--max-worker-port=0")
    try:
        head = _ray("start", "--head", f"--port={head_port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={client_port}", *random_worker_ports,
                    f"--dashboard-agent-listen-port={agent_ports[0]}", f"--metrics-export-port={agent_ports[1]}")
        assert head.returncode == 0, head.stdout + head.stderr
        # The second node has its own agent and metrics ports (both nodes share one address).
        worker = _ray("start", f"--address=127.0.0.1:{head_port}", "--num-cpus=1", *random_worker_ports,
                      f"--dashboard-agent-listen-port={agent_ports[2]}", f"--metrics-export-port={agent_ports[3]}")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_nodes(dashboard, 2)
        yield dashboard
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    return _ray("job", "submit", f"--address={address}", "--working-dir", ".", "--", "python", *entrypoint,
                timeout=900)


def test_nightly_job_submitted_to_a_two_node_cluster_commits_its_run(cluster, trained_bundle, tmp_path):
    images = sorted((Path(trained_bundle["data"]) / "Images").glob("*.png"))
    day, other = tmp_path / "archive" / "2026" / "11" / "24", tmp_path / "archive" / "2026" / "11" / "19"
    day.mkdir(parents=True)
    other.mkdir(parents=True)
    for image in images[:12]:
        shutil.copy(image, day / image.name)
    shutil.copy(images[12], other / images[12].name)  # beyond the job's 3-day look-back: not labelled
    out = tmp_path / "labels"
    done = _submit(cluster, "jobs/nightly_label.py", "--model", trained_bundle["bundle"],
                   "--archive", str(tmp_path / "archive"), "--output", str(out), "--date", "2026-11-24")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "run=nightly-2026-11-24" / "_SUCCESS.json").read_text())
    assert summary["objects"]["labelled"] == 12 and summary["rows"] == 12 and summary["errors"] == 0


def test_two_worker_training_job_is_placed_on_both_nodes(cluster, trained_bundle, tmp_path):
    from ray.util.state import list_actors, list_tasks

    done = _submit(cluster, "jobs/train.py", "--data", trained_bundle["data"], "--output", str(tmp_path / "b"),
                   "--epochs", "1", "--image-size", "64", "--num-workers", "2",
                   "--set", "train.cpus_per_worker=1", "--set", "model.pretrained=none",
                   "--set", "data.augment_on=device",  # batched augmentation across the two nodes too
                   "--set", "data.cache=memory")  # Ray Data ingest (auto keeps a few images on the driver)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["training"]["num_workers"] == 2
    workers = list_actors(address=cluster, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    # One CPU per node and one CPU per worker: DDP only runs with a worker on each node.
    assert len({w.node_id for w in workers}) == 2, workers
    # The images were decoded by Ray Data tasks on both nodes, none by the driver.
    tasks = [t for t in list_tasks(address=cluster, detail=True, limit=10_000, raise_on_missing_output=False)
             if "decode_rows" in t.name]
    assert len({t.node_id for t in tasks}) == 2, [(t.name, t.node_id) for t in tasks]
