"""How the labelling actors are sized on the cluster they run on.

Pure functions of what Ray reports (``ray.nodes()``, ``ray.cluster_resources()``), passed in by
the caller, so every sizing rule is tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DECODE_THREADS = 16
CPU_DECODE_THREADS = 2  # a CPU predictor shares its cores with torch: two threads keep it fed
GPU_DECODE_THREADS_UNKNOWN = 4  # a GPU predictor before any GPU node is up to measure


@dataclass(frozen=True)
class PredictorResources:
    """What each predictor actor reserves from Ray and how many threads it runs."""

    num_cpus: float
    num_gpus: float
    torch_threads: int | None  # None: leave torch's default (a GPU predictor)
    decode_threads: int


def _alive(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive")]


def torch_threads(nodes: list[dict], workers: int) -> int:
    """Torch threads per CPU predictor: the smallest live node's CPUs shared among the actors
    (at most one actor per CPU counted)."""
    cpus = min((int(n["Resources"].get("CPU", 1)) for n in _alive(nodes)), default=1)
    return max(1, cpus // max(1, min(workers, cpus)))


def gpu_share(resources: dict, workers: int) -> float:
    """GPUs per GPU predictor. One GPU outruns one process's reading and decoding many times
    over (measured on an H100: 18,000 images/s of inference+CAM vs ~100 decoded/s per
    process), so where ``workers`` exceeds the cluster's GPUs, the actors share them. On a
    cluster with no GPU node up yet (autoscaling from zero) each actor asks for a whole one."""
    gpus = resources.get("GPU", 0.0)
    return 1.0 if gpus == 0 or workers <= gpus else gpus / workers


def decode_threads(nodes: list[dict], resources: dict, workers: int, use_gpu: bool) -> int:
    """Read/decode threads per predictor: a GPU predictor gets its share of its node's CPU cores
    (on the GPU node with the fewest CPUs per GPU); a CPU predictor shares them with torch."""
    if not use_gpu:
        return CPU_DECODE_THREADS
    gpu_nodes = [n for n in _alive(nodes) if n["Resources"].get("GPU")]
    if not gpu_nodes:
        return GPU_DECODE_THREADS_UNKNOWN
    per_gpu = min(n["Resources"].get("CPU", 2) / n["Resources"]["GPU"] for n in gpu_nodes)
    return max(2, min(int(per_gpu * gpu_share(resources, workers)), MAX_DECODE_THREADS))


def size_predictors(nodes: list[dict], resources: dict, workers: int, use_gpu: bool) -> PredictorResources:
    """Each of ``workers`` predictors' reservation and threads.

    A CPU predictor reserves one CPU while its torch threads use its share of the node's cores;
    a GPU predictor reserves no CPU and its share of a GPU.
    """
    if use_gpu:
        return PredictorResources(0, gpu_share(resources, workers), None,
                                  decode_threads(nodes, resources, workers, True))
    return PredictorResources(1, 0, torch_threads(nodes, workers), decode_threads(nodes, resources, workers, False))
