"""How labelling actors are sized, from what Ray reports about the cluster (no Ray started)."""

from __future__ import annotations

import pytest

from fpc_ray.label.resources import (
    CPU_DECODE_THREADS,
    GPU_DECODE_THREADS_UNKNOWN,
    GPU_PREDICT_FRAMES,
    MAX_DECODE_THREADS,
    OVERLAY_CPUS,
    PredictorResources,
    decode_threads,
    gpu_share,
    size_predictors,
    size_split,
    torch_threads,
)


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()``, as much of it as the sizing reads."""
    resources = {"CPU": cpus, "memory": 8e9, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Resources": resources}


def _cluster(nodes: list[dict]) -> dict:
    """``ray.cluster_resources()`` of those nodes (the live ones)."""
    total: dict[str, float] = {}
    for node in nodes:
        if node["Alive"]:
            for key, value in node["Resources"].items():
                total[key] = total.get(key, 0) + value
    return total


@pytest.mark.parametrize("cpus,workers,threads", [(16, 1, 16), (16, 4, 4), (16, 3, 5), (2, 4, 1), (2, 2, 1)])
def test_cpu_predictors_share_the_node_cores(cpus, workers, threads):
    nodes = [_node(cpus)]
    assert torch_threads(nodes, workers) == threads
    assert size_predictors(nodes, _cluster(nodes), workers, use_gpu=False) == \
        PredictorResources(num_cpus=1, num_gpus=0, torch_threads=threads, decode_threads=CPU_DECODE_THREADS)


def test_cpu_threads_follow_the_smallest_live_node():
    nodes = [_node(32), _node(8), _node(2, alive=False)]
    assert torch_threads(nodes, 2) == 4
    assert torch_threads([], 2) == 1  # no node reported: one thread, never zero


@pytest.mark.parametrize("gpus,workers,share", [(1, 1, 1.0), (4, 2, 1.0), (4, 4, 1.0), (1, 4, 0.25), (2, 8, 0.25),
                                                (0, 3, 1.0)])
def test_gpu_share(gpus, workers, share):
    """More workers than GPUs share them; with no GPU up yet (autoscaling from zero) each asks
    for a whole one, which is what brings a GPU node up."""
    assert gpu_share({"CPU": 8, **({"GPU": gpus} if gpus else {})}, workers) == share


@pytest.mark.parametrize("cpus,gpus,workers,threads", [
    (16, 1, 1, 16),   # one GPU, the node's 16 cores for its one predictor
    (64, 2, 2, 16),   # 32 cores per GPU: capped
    (16, 4, 4, 4),    # 4 cores per GPU
    (16, 1, 4, 4),    # four predictors share one GPU, and its 16 cores
    (4, 1, 8, 2),     # half a core each: never fewer than two threads
])
def test_gpu_predictors_get_their_share_of_the_gpu_nodes_cores(cpus, gpus, workers, threads):
    nodes = [_node(cpus, gpus)]
    sized = size_predictors(nodes, _cluster(nodes), workers, use_gpu=True)
    assert sized.decode_threads == threads <= MAX_DECODE_THREADS
    assert sized.num_cpus == 0 and sized.torch_threads is None
    assert sized.num_gpus == gpu_share(_cluster(nodes), workers)


def test_gpu_threads_follow_the_gpu_node_with_fewest_cores_per_gpu():
    nodes = [_node(64), _node(32, 2), _node(24, 4), _node(96, 1, alive=False)]
    assert decode_threads(nodes, _cluster(nodes), 6, use_gpu=True) == 6


def test_gpu_predictors_before_any_gpu_node_is_up():
    nodes = [_node(8)]  # the head node only: the GPU workers autoscale from zero
    assert size_predictors(nodes, _cluster(nodes), 2, use_gpu=True) == \
        PredictorResources(num_cpus=0, num_gpus=1.0, torch_threads=None, decode_threads=GPU_DECODE_THREADS_UNKNOWN)


@pytest.mark.parametrize("cpus,gpus,workers,decoders,overlays", [
    (16, 1, 1, 13, 3),  # the GPU node: 15 CPUs for the CPU stages, one overlay (half a CPU) per six
    (64, 4, 4, 57, 11),
    (4, 1, 2, 2, 1),
    (2, 1, 1, 1, 1),    # never fewer than one of each
])
def test_split_design_on_gpu_nodes_gives_the_cpus_to_decoding(cpus, gpus, workers, decoders, overlays):
    nodes = [_node(cpus, gpus)]
    sized = size_split(nodes, _cluster(nodes), workers, use_gpu=True, batch_size=32)
    assert (sized.decoders, sized.overlays) == (decoders, overlays)
    # A CPU left to the writes and the driver.
    assert sized.decoders + sized.overlays * OVERLAY_CPUS <= max(2, cpus - 1)
    assert sized.predictor == PredictorResources(0, gpu_share(_cluster(nodes), workers), None, 0)
    assert sized.predict_frames == GPU_PREDICT_FRAMES


def test_split_design_on_a_cpu_cluster_leaves_the_cpu_predictors_their_cores():
    nodes = [_node(8)]
    sized = size_split(nodes, _cluster(nodes), 2, use_gpu=False, batch_size=32)
    assert sized.predictor == PredictorResources(1, 0, torch_threads(nodes, 2), 0)
    assert (sized.decoders, sized.overlays) == (4, 1)  # 8 - 2 predictors - 1
    assert sized.predict_frames == 32  # a CPU pass stays --batch-size frames
    big = size_split(nodes, _cluster(nodes), 1, use_gpu=True, batch_size=2048)
    assert big.predict_frames == 2048  # a larger --batch-size than the GPU default is kept
