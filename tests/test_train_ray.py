"""Ray Train on a real local Ray cluster: DDP workers, checkpoints, and S3 storage (SeaweedFS)."""

import json

import pytest

from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.train.driver import run_training

pytestmark = [pytest.mark.ray, pytest.mark.s3]


@pytest.fixture(scope="module")
def ray_with_s3(s3_server, ray_cluster):
    """The session's Ray cluster, started after the AWS variables point at the embedded S3, so
    workers inherit them."""
    return s3_server


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ddp-data")
    synthesize(str(out), per_class=30, seed=11, width=160, height=120)
    return str(out)


def _cfg(workers: int, epochs: int = 4):
    return load_config(None, [
        f"train.num_workers={workers}", f"train.epochs={epochs}", "train.batch_size=16",
        "train.cpus_per_worker=1", "data.image_size=64", "data.decode_threads=2",
    ])


def test_ddp_training_checkpoints_and_learns(ray_with_s3, dataset, tmp_path):
    """Two DDP workers: the backbone thaws after the frozen epoch (a re-wrap), validation sums are
    all-reduced, rank 0 checkpoints and Ray keeps the best two."""
    out = tmp_path / "bundle"
    cfg = _cfg(2, epochs=3)
    outcome = run_training(cfg, dataset, str(out))
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["backbone_frozen"] for h in history] == [True, False, False]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.01 * cfg.train.lr)  # stepped once per optimizer step
    # Ray Train persisted checkpoints for the run under OUTPUT/ray.
    checkpoints = [p for p in (out / "ray").glob("train-*/checkpoint_*") if p.is_dir()]
    assert 1 <= len(checkpoints) <= 2  # keep_checkpoints=2 of 3
    assert {"model.safetensors", "state.pt", "history.json"} <= {p.name for p in checkpoints[0].iterdir()}
    card = outcome.card
    assert card["training"]["num_workers"] == 2
    test = evaluate_bundle(str(out), dataset, "test")
    assert test["top1"] == pytest.approx(card["metrics"]["test"]["top1"])
    assert test["top1"] > 0.5  # chance is 1/6


def test_training_reads_and_writes_s3(ray_with_s3, tmp_path):
    """One Ray Train worker (no DDP), with the data, the run's checkpoints and the bundle on S3."""
    server = ray_with_s3
    synthesize("s3://test/phantom", per_class=12, seed=4, width=160, height=120)
    outcome = run_training(_cfg(1, epochs=2), "s3://test/phantom", "s3://test/models/run1")
    assert outcome.card["training"]["num_workers"] == 1
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    keys = {o["Key"] for o in server.client().list_objects_v2(Bucket="test", Prefix="models/run1/")["Contents"]}
    assert {"models/run1/model.safetensors", "models/run1/model.json", "models/run1/metrics.json"} <= keys
    assert any(k.startswith("models/run1/ray/train-") and k.endswith("/state.pt") for k in keys)
    report = evaluate_bundle("s3://test/models/run1", "s3://test/phantom", "test")
    assert report["top1"] == pytest.approx(outcome.card["metrics"]["test"]["top1"])
