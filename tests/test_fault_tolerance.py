"""A training worker dies mid-run: Ray Train restarts the group from the last checkpoint.

One worker: a group of two proves nothing more here (DDP runs in test_train_ray and test_cluster)
and starts, and restarts, twice the processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fpc_ray.data.synth import synthesize

pytestmark = pytest.mark.ray


def _train_worker_pids(cluster: str) -> list[int]:
    """The Ray Train workers alive in the session's cluster (its tests run one at a time, so they
    are this test's run's), from Ray's state API. The cluster is named: another one on the machine
    (a parallel test worker's) makes Ray's autodetection refuse, and its workers are never touched."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)
    return sorted(a.pid for a in actors if a.pid)


def test_worker_killed_mid_training_resumes_from_checkpoint(ray_cluster, tmp_path):
    data, out = tmp_path / "data", tmp_path / "bundle"
    synthesize(str(data), per_class=12, seed=5, width=128, height=96)
    cmd = [sys.executable, "-m", "fpc_ray.cli", "train", "--data", str(data), "--output", str(out),
           "--epochs", "2", "--image-size", "64", "--batch-size", "8", "--num-workers", "1",
           "--set", "train.max_failures=1",
           # Resume with Ray Data ingest (auto would keep these few images on the driver's arrays
           # path); two epochs, one before the kill and one after, keep Ray Data's start-ups few.
           "--set", "data.cache=memory"]
    # The CLI joins the session's cluster (as inside a Ray job): no cluster start of its own.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # The controller writes its snapshot once a checkpoint is registered for restarts.
            if list(out.glob("ray/train-*/checkpoint_manager_snapshot.json")):
                pids = _train_worker_pids(ray_cluster)
                if pids:
                    killed = pids[-1]
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no checkpoint appeared before the run ended"
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from the checkpoint of epoch" in output, output
    assert "data ingest: memory (data.cache)" in output, output
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # each epoch once, none lost
    # The resumed scheduler went on from the steps done: the run ends at 1 % of the peak rate.
    assert history[-1]["lr"] == pytest.approx(0.01 * 2e-3)
    card = json.loads((out / "model.json").read_text())
    assert card["metrics"]["test"]["n"] > 0
