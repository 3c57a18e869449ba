"""fpc-ray tune: the space's validation, and one real small search, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.errors import UserError
from fpc_ray.tune.space import load_tune_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# A search small enough for 2 CPUs: 64 px, 1 epoch, two trials at a time (one CPU each).
SMALL_SPACE = """
base: {train}
train: {{batch_size: 8, frozen_epochs: 0}}
search: {{grace_period: 1, max_concurrent: 2}}
space:
  model.attention.type: {{choice: [cbam, se, eca]}}
  model.head.hidden: {{choice: [[512, 256], [64, 32]]}}
  train.lr: {{loguniform: [1.0e-3, 4.0e-3]}}
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fpc_ray", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    synthesize(str(root / "data"), per_class=8, seed=11, width=128, height=96)
    spec = root / "space.yaml"
    spec.write_text(SMALL_SPACE.format(train=ROOT / "configs" / "train.yaml"))
    return root / "data", spec


# ---------------------------------------------------------------- the space
def test_builtin_search_is_configs_tune_yaml():
    assert load_tune_spec(ROOT / "configs" / "tune.yaml") == load_tune_spec(None)


@pytest.mark.parametrize("space, field", [
    ("model.attention.type: {choice: [cbam, transformer]}", "space.model.attention.type"),
    ("model.head.hiden: {choice: [[64, 32]]}", "space.model.head.hiden"),
    ("train.lr: {loguniform: [0, 0.1]}", "space.train.lr"),
    ("train.lr: {uniform: [0.01, 0.001]}", "space.train.lr"),
    ("model.head.dropout: {uniform: [0.1, 1.5]}", "space.model.head.dropout"),
    ("train.batch_size: {choice: [8], uniform: [1, 2]}", "space.train.batch_size"),
    ("data.image_size: {choice: [64, 128]}", "space.data.image_size"),
])
def test_bad_space_names_the_field(tmp_path, space, field):
    path = tmp_path / "bad.yaml"
    path.write_text(f"space:\n  {space}\n")
    with pytest.raises(UserError) as err:
        load_tune_spec(path)
    assert str(err.value).startswith(field), str(err.value)


def test_bad_space_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("space:\n  model.attention.type: {choice: [cbam, transformer]}\n")
    done = runner.invoke(app, ["tune", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(path)])
    assert done.exit_code == 2
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: space.model.attention.type"), done.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("data", ["s3://b/FETAL_PLANES_DB", ["s3://b/FETAL_PLANES_DB", "s3://b/reviewed-1"]])
def test_a_search_saves_its_datasets_and_a_resume_reads_them_back(tmp_path, data):
    """Several --data: every trial trains on the same joined data, also after --resume."""
    from fpc_ray.storage import resolve
    from fpc_ray.tune.search import _save_or_restore_spec

    spec, out = load_tune_spec(None), resolve(str(tmp_path / "search"))
    out.makedirs()
    assert _save_or_restore_spec(spec, data, out, resume=False) == (spec, data)
    assert _save_or_restore_spec(load_tune_spec(None, {"train.epochs": 1}), "ignored", out, resume=True) == (spec, data)


def test_cli_flags_override_the_spec():
    spec = load_tune_spec(None, {"train.epochs": 3, "data.image_size": 64, "search.num_samples": 5,
                                 "search.max_concurrent": None})
    assert (spec.base.train.epochs, spec.base.data.image_size, spec.search.num_samples) == (3, 64, 5)
    assert spec.search.max_concurrent == 1
    assert spec.default_point()["model.attention.type"] == "cbam"


# ---------------------------------------------------------------- real searches
def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "trials.parquet").to_pylist()


def _check_finished_search(out: Path, n: int) -> list[dict]:
    rows = _rows(out)
    assert len(rows) == n and len({r["trial_id"] for r in rows}) == n
    assert sum(r["is_default"] for r in rows) == 1
    for r in rows:
        assert r["status"] in ("completed", "stopped"), r
        assert r["parameters"] > 0 and r["epochs_run"] == 1
        assert 0.0 <= r["best_val_top1"] <= r["best_val_top2"] <= 1.0
    completed = [r for r in rows if r["status"] == "completed"]
    best = max(completed, key=lambda r: (r["best_val_top1"], r["best_val_top2"]))
    card = json.loads((out / "best" / "model.json").read_text())
    assert card["metrics"]["val"]["val_top1"] == best["best_val_top1"]
    assert (out / "best" / "model.safetensors").stat().st_size > 0
    return rows


def _run_until_a_trial_finishes(cmd: list[str], env: dict, out: Path) -> dict[str, int]:
    """Start a search, SIGKILL its driver once a trial's bundle is written; the finished trials'
    card mtimes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    finished: dict[str, int] = {}
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("trials/*/model.json")):
                time.sleep(0.5)  # let the bundle's last file land
                finished = {c.parent.name: c.stat().st_mtime_ns for c in out.glob("trials/*/model.json")}
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    assert finished, f"no trial finished before the search ended: {output[-3000:]}"
    return finished


@pytest.mark.ray
def test_search_killed_then_resumed_records_its_trials_and_best_yaml_trains(search_inputs, ray_local,
                                                                                   tmp_path):
    """One real search covers both the finished search and resumption: it is killed once its first
    trial has finished, resumed to the end, then checked as a finished search (rows, statuses,
    leaderboard, best/, best.yaml that `fpc-ray train` reads) whose finished trials were not re-run.
    Three trials, two at a time: the default and one more run, then the kill, then the rest.

    Both searches run on the session's Ray cluster: the first in a driver process that joins it
    through RAY_ADDRESS (as inside a Ray job) and is killed, its actors dying with it; the resumed
    one in this process, as on a local cluster (trial CPUs sized from the cluster's)."""
    data, spec = search_inputs
    out = tmp_path / "search"
    args = ("tune", "--data", str(data), "--output", str(out), "--config", str(spec),
            "--num-samples", "3", "--epochs", "1", "--image-size", "64")
    finished = _run_until_a_trial_finishes(_cli(*args), {**_env(), "RAY_ADDRESS": ray_local}, out)
    assert len(finished) < 3 and not (out / "trials.parquet").exists()

    done = runner.invoke(app, ["tune", "--data", str(data), "--output", str(out), "--resume"])
    assert done.exit_code == 0, done.output[-3000:]
    assert "resuming the search" in done.output
    assert "(default)" in done.output and "vs the default configuration" in done.output
    rows = _check_finished_search(out, 3)
    for trial_id, mtime in finished.items():  # finished trials were not trained again
        assert (out / "trials" / trial_id / "model.json").stat().st_mtime_ns == mtime
        assert any(r["trial_id"] == trial_id and r["status"] == "completed" for r in rows)

    best_yaml = out / "best.yaml"
    cfg = load_config(best_yaml)  # fpc-ray train reads it as it is
    assert cfg.data.image_size == 64 and cfg.train.epochs == 1
    # In-process (0 Ray workers): the search's trials already trained this config on Ray.
    trained = runner.invoke(app, ["train", "--config", str(best_yaml), "--data", str(data),
                                  "--output", str(tmp_path / "from-best"), "--num-workers", "0"])
    assert trained.exit_code == 0, trained.output[-3000:]
    card = json.loads((tmp_path / "from-best" / "model.json").read_text())
    assert card["config"]["model"] == yaml.safe_load(best_yaml.read_text())["model"]

    again = runner.invoke(app, ["tune", "--data", str(data), "--output", str(out), "--config", str(spec)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_resume_without_a_search_is_one_line(tmp_path):
    done = runner.invoke(app, ["tune", "--data", str(tmp_path), "--output", str(tmp_path / "none"), "--resume"])
    assert done.exit_code == 2 and done.output.startswith("error: --resume: no search to resume"), done.output


def test_a_search_is_checked_against_its_smallest_batch_size():
    from fpc_ray.tune.search import _smallest_batch

    assert _smallest_batch(load_tune_spec(None, {"train.batch_size": 64})) == 16  # the built-in space: 16 or 32
    spec = load_tune_spec(None, {"train.batch_size": 64})
    spec.space.pop("train.batch_size")
    assert _smallest_batch(spec) == 64
