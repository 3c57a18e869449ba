"""How the labelling actors are sized on the cluster they run on.

Pure functions of what Ray reports (``ray.nodes()``, ``ray.cluster_resources()``), passed in by
the caller, so every sizing rule is tested without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_DECODE_THREADS = 16
CPU_DECODE_THREADS = 2  # a CPU predictor shares its cores with torch: two threads keep it fed
GPU_DECODE_THREADS_UNKNOWN = 4  # a GPU predictor before any GPU node is up to measure
WRITE_CPUS = 0.25  # each Parquet write task's reservation (writes are light)
# The split design (split.py). Frames per GPU predictor call: hundreds keep the GPU's kernels
# full (EfficientNet-Lite0 at 224 px, bf16: ~24,000 frames/s at 1024 a pass on an H200) while a
# batch's activations stay far below any GPU's memory.
GPU_PREDICT_FRAMES = 512
# One overlay task (CAM overlay + PNG of a 128 px thumbnail: ~0.4 ms a frame) per this many
# CPUs left to the CPU stages; decoding (~4-6 ms a frame) takes the rest. An overlay task is busy
# a tenth as long as a decoder, so it reserves half a CPU: whole CPUs would idle a core that
# decoding needs (on 16 CPUs: 13 decoders instead of 12).
CPUS_PER_OVERLAY = 6
OVERLAY_CPUS = 0.5


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


@dataclass(frozen=True)
class SplitResources:
    """The split design's stages: CPU tasks at once per CPU stage, the predictors' reservation,
    and the frames each predictor call takes (its Ray Data batch size)."""

    decoders: int
    overlays: int
    predictor: PredictorResources
    predict_frames: int


def size_split(nodes: list[dict], resources: dict, workers: int, use_gpu: bool, batch_size: int) -> SplitResources:
    """The split design on this cluster: every CPU not held by a CPU predictor or the writes runs a
    decode or an overlay task (one CPU each); GPU predictors hold their GPU share and no CPU.

    Args:
        batch_size: frames per CPU predictor call (``--batch-size``); a GPU predictor takes at
            least :data:`GPU_PREDICT_FRAMES`.
    """
    if use_gpu:
        predictor = PredictorResources(0, gpu_share(resources, workers), None, 0)
    else:
        predictor = PredictorResources(1, 0, torch_threads(nodes, workers), 0)
    cpus = int(resources.get("CPU", 1))
    # One CPU left to the Parquet writes (a quarter CPU each) and the driver.
    free = max(2, cpus - workers * int(predictor.num_cpus) - 1)
    overlays = -(-free // CPUS_PER_OVERLAY)
    frames = max(batch_size, GPU_PREDICT_FRAMES) if use_gpu else batch_size
    return SplitResources(max(1, free - math.ceil(overlays * OVERLAY_CPUS)), overlays, predictor, frames)
