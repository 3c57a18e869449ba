"""A training worker dies mid-run: Ray Train restarts the group from the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpc_ray.data.synth import synthesize

pytestmark = pytest.mark.ray


def _train_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def test_worker_killed_mid_training_resumes_from_checkpoint(tmp_path):
    data, out = tmp_path / "data", tmp_path / "bundle"
    synthesize(str(data), per_class=20, seed=5, width=160, height=120)
    cmd = [sys.executable, "-m", "fpc_ray.cli", "train", "--data", str(data), "--output", str(out),
           "--epochs", "4", "--image-size", "64", "--batch-size", "8", "--num-workers", "2",
           "--set", "train.max_failures=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # The controller writes its snapshot once a checkpoint is registered for restarts.
            if list(out.glob("ray/train-*/checkpoint_manager_snapshot.json")):
                pids = _train_worker_pids()
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
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # each epoch once, none lost
    card = json.loads((out / "model.json").read_text())
    assert card["metrics"]["test"]["n"] > 0
