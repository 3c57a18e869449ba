"""Ray Train on a real local Ray cluster: DDP workers, checkpoints, and S3 storage (SeaweedFS)."""


import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.model.weights import lite0_in1k_state_dict
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.train.driver import run_training

pytestmark = [pytest.mark.ray, pytest.mark.s3]


@pytest.fixture(scope="module")
def ray_with_s3(s3_server, ray_cluster):
    """The session's Ray cluster, started after the AWS variables point at the embedded S3, so
    workers inherit them."""
    return s3_server


def _cfg(workers: int, epochs: int = 4, *more: str):
    return load_config(None, [
        f"train.num_workers={workers}", f"train.epochs={epochs}", "train.batch_size=16",
        "train.cpus_per_worker=1", "data.image_size=64", "data.decode_threads=2", *more,
    ])


def test_ddp_training_on_s3_checkpoints_and_learns(ray_with_s3):
    """Two DDP workers with the data, the run's checkpoints and the bundle on S3: the backbone thaws
    after the frozen epoch (a re-wrap), validation sums are all-reduced, rank 0 checkpoints and Ray
    keeps the best two. (One Ray Train run: a second, single-worker one proved nothing more.) The
    workers augment whole batches in torch (``augment_on=device``, the GPU's path) over gloo: the
    multi-worker path of a GPU node, on CPUs."""
    server = ray_with_s3
    synthesize("s3://test/ddp-data", per_class=30, seed=11, width=160, height=120)
    cfg = _cfg(2, 3, "data.augment_on=device")
    outcome = run_training(cfg, "s3://test/ddp-data", "s3://test/models/ddp")
    history = outcome.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["backbone_frozen"] for h in history] == [True, False, False]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.01 * cfg.train.lr)  # stepped once per optimizer step
    assert outcome.card["training"]["num_workers"] == 2

    listing = server.client().list_objects_v2(Bucket="test", Prefix="models/ddp/")["Contents"]
    keys = {o["Key"] for o in listing}
    assert {"models/ddp/model.safetensors", "models/ddp/model.json", "models/ddp/metrics.json"} <= keys
    # Ray Train persisted the run's checkpoints under OUTPUT/ray: ray/train-<id>/checkpoint_<n>/...
    checkpoints: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        if parts[2] == "ray" and len(parts) == 6 and parts[4].startswith("checkpoint_"):
            checkpoints.setdefault(parts[4], set()).add(parts[5])
    assert 1 <= len(checkpoints) <= 2, checkpoints  # keep_checkpoints=2 of 3
    for files in checkpoints.values():
        assert {"model.safetensors", "state.pt", "history.json"} <= files

    # The thaw (and DDP's re-wrap over the backbone's parameters) trained the backbone: in the last
    # epoch's checkpoint (Ray keeps the latest) its weights left the pretrained ones, which a frozen
    # or never re-wrapped backbone would still hold. (The bundle holds the best epoch's weights,
    # which may be the frozen first one.)
    client = server.client()
    last = max(checkpoints, key=lambda name: len(json.loads(client.get_object(
        Bucket="test", Key=_checkpoint_key(keys, name, "history.json"))["Body"].read())["history"]))
    weights = load_safetensors(client.get_object(Bucket="test", Key=_checkpoint_key(keys, last, "model.safetensors"))
                               ["Body"].read())
    pretrained = lite0_in1k_state_dict()
    moved = [k for k in ("conv_stem.weight", "blocks.3.0.conv_pw.weight")
             if not torch.equal(weights["backbone." + k], pretrained[k])]
    assert len(moved) == 2, moved

    test = evaluate_bundle("s3://test/models/ddp", "s3://test/ddp-data", "test")
    assert test["top1"] == pytest.approx(outcome.card["metrics"]["test"]["top1"])
    assert test["top1"] > 0.5  # chance is 1/6


def _checkpoint_key(keys: set[str], checkpoint: str, name: str) -> str:
    (key,) = [k for k in keys if k.split("/")[4:6] == [checkpoint, name]]
    return key


def test_workers_sharing_a_gpu_get_fractions_of_it_and_gloo(ray_cluster, tmp_path):
    """Two workers with half a GPU each may land on one GPU, where NCCL refuses two ranks: the
    trainer asks Ray for the fractions and picks gloo. Whole GPUs keep Ray's default (NCCL)."""
    from fpc_ray.data.dataset import SplitArrays
    from fpc_ray.storage import resolve
    from fpc_ray.train.driver import PreparedData, _build_trainer

    split = SplitArrays(np.zeros((2, 32, 32), np.uint8), np.zeros(2, np.int64), ["a", "b"])
    prepared = PreparedData([], {"train": split.labels}, 32, "arrays", arrays={"train": split, "val": split})

    def trainer(*more: str):
        cfg = _cfg(2, 2, "train.use_gpu=true", "train.cpus_per_worker=2", *more)
        return _build_trainer(cfg, prepared, None, resolve(str(tmp_path)), "r", None)

    shared = trainer("train.gpus_per_worker=0.5")
    assert shared.scaling_config.resources_per_worker == {"CPU": 2.0, "GPU": 0.5}
    assert shared.backend_config.backend == "gloo"
    whole = trainer()
    assert whole.scaling_config.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert whole.backend_config.backend == "nccl"


def test_gpu_workers_that_do_not_fit_fail_fast_in_gpus(ray_cluster):
    """The session's cluster has no GPU: even two half-GPU workers are refused, in one line."""
    from fpc_ray.errors import UserError
    from fpc_ray.train.driver import check_workers_fit

    with pytest.raises(UserError, match=r"2 GPU worker\(s\) x 0.5 GPUs \(train.gpus_per_worker\) do not fit "
                                        r"this machine's 0 GPUs"):
        check_workers_fit(2, 1.0, True, 0.5)
    check_workers_fit(2, 1.0, False, 0.5)  # CPU workers: the GPU fraction asks for nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: two Ray Train workers sharing one")
def test_two_workers_sharing_one_gpu_train_checkpoint_and_resume(ray_cluster, tmp_path):
    """The multi-worker GPU path on a one-GPU node: two workers with half the GPU each, DDP over
    gloo on CUDA tensors, batches augmented on the GPU; a rerun with the run's name and one more
    epoch resumes from its last checkpoint (the first two epochs' records come back unchanged)."""
    data, out = str(tmp_path / "data"), str(tmp_path / "bundle")
    synthesize(data, per_class=12, seed=5, width=128, height=96)
    more = ("train.use_gpu=true", "train.gpus_per_worker=0.5", "train.batch_size=8", "model.pretrained=none")
    first = run_training(_cfg(2, 2, *more), data, out, run_name="shared-gpu")
    assert [h["epoch"] for h in first.history] == [1, 2]
    assert first.card["training"]["use_gpu"] and first.card["training"]["num_workers"] == 2
    resumed = run_training(_cfg(2, 3, *more), data, out, overwrite=True, run_name="shared-gpu")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history  # read from the checkpoint, not trained again
    assert resumed.history[2]["train_loss"] > 0
