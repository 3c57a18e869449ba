"""``fpc-ray bench ingest``: does training's input scale with the data, not with one machine?

The data is written K times over as distinct rows (each image under K names, each patient as K
patients, so the split keeps its proportions) and ``fpc-ray train`` (one Ray worker) runs on 1x
and on Kx with ``data.cache`` as given (``auto``: each run's line says which ingest path
:func:`~fpc_ray.data.ingest.choose_ingest` took). While each runs, the driver's and the Train
worker's own memory (USS: private pages; object-store pages a process maps are Ray's, not its own)
are sampled, and the peaks compared. Training images/s on Kx are compared with a plain in-memory
PyTorch loop on the same Kx data (:func:`~fpc_ray.bench.train_speed.plain_loop_images_per_s`).

Why small data keep the driver-array path: 1x runs once more with Ray Data forced (``memory``, or
``stream`` if that was set), and its images/s stand next to the arrays path's. The last line is
one JSON object with the ratios and the paths taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fpc_ray.config import Config
from fpc_ray.data.fetal_planes import CSV_NAME, IMAGE_EXT, IMAGES_DIR, read_fetal_planes, write_csv

SAMPLE_S = 0.2  # how often each process's USS is read
ACTORS_S = 2.0  # how often the Train workers are looked up (Ray's state API is not free)


def uss_bytes(pid: int) -> int:
    """A process's unique set size: its private pages, from ``/proc/<pid>/smaps_rollup`` (0 once gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    kb = sum(int(line.split()[1]) for line in text.splitlines()
             if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")))
    return kb * 1024


def scaled_copy(cfg: Config, data_uri: str, scale: int, out: str) -> str:
    """The dataset written ``scale`` times over into ``out``: copy k of image X is ``X_k``, of
    patient P is patient ``P + k * (max patient + 1)``; the images are the same bytes."""
    db = read_fetal_planes(data_uri, cfg.storage)
    images = Path(out, IMAGES_DIR)
    images.mkdir(parents=True, exist_ok=True)
    step = max(r.patient for r in db.records) + 1
    records = []
    for record in db.records:
        _, data = db.read_image(record)
        for k in range(scale):
            copy = dataclasses.replace(record, image_name=f"{record.image_name}_{k}", patient=record.patient + k * step)
            (images / (copy.image_name + IMAGE_EXT)).write_bytes(data)
            records.append(copy)
    Path(out, CSV_NAME).write_text(write_csv(records))
    return out


class PeakUSS:
    """Samples the USS of a driver process and of the Ray Train workers alive in a cluster, in a
    thread, and keeps each one's peak (the workers': the largest of any worker)."""

    def __init__(self, driver_pid: int, cluster: str):
        self.driver_pid, self.cluster = driver_pid, cluster
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakUSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _workers(self) -> list[int]:
        from ray.util.state import list_actors

        try:
            actors = list_actors(address=self.cluster, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")],
                                 detail=True, raise_on_missing_output=False)
        except Exception:  # the state API is busy: look again at the next round
            return []
        return [a.pid for a in actors if a.pid]

    def _run(self) -> None:
        workers, looked = [], 0.0
        while not self._stop.is_set():
            if time.monotonic() - looked > ACTORS_S:
                workers, looked = self._workers() or workers, time.monotonic()
            self.driver = max(self.driver, uss_bytes(self.driver_pid))
            self.worker = max([self.worker] + [uss_bytes(pid) for pid in workers])
            self._stop.wait(SAMPLE_S)


def _train_in_subprocess(cfg: Config, data: str, out: str, cluster: str, cache: str) -> tuple[dict, list[dict], str]:
    """``fpc-ray train`` as its own driver process joined to the cluster; its peaks, history and output."""
    overrides = [f"{k}={v}" for k, v in (("data.image_size", cfg.data.image_size),
                                         ("train.batch_size", cfg.train.batch_size),
                                         ("train.epochs", cfg.train.epochs), ("train.frozen_epochs", 0),
                                         ("train.num_workers", 1),
                                         ("train.cpus_per_worker", cfg.train.cpus_per_worker),
                                         ("data.cache", cache))]
    cmd = [sys.executable, "-m", "fpc_ray.cli", "train", "--data", data, "--output", out]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with PeakUSS(proc.pid, cluster) as peaks:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fpc-ray train on {data} failed:\n{output[-3000:]}")
    history = json.loads(Path(out, "metrics.json").read_text())
    return {"driver": peaks.driver, "worker": peaks.worker}, history, output


def _ingest_line(output: str) -> str:
    return next((line for line in output.splitlines() if line.startswith("data ingest:")), "data ingest: ?")


def _ingest(output: str) -> str:
    """The path a run took, from its ``data ingest: PATH (why); ...`` line."""
    return _ingest_line(output).split()[2]


def _images_per_s(history: list[dict]) -> float:
    """Mean training images/s of the epochs after the first (the warm-up)."""
    rates = [h["images_per_s"] for h in history[1:]] or [history[-1]["images_per_s"]]
    return sum(rates) / len(rates)


def run_benchmark(cfg: Config, data_uri: str, scale: int) -> list[str]:
    """Train on 1x and ``scale``x; the report lines, the last one JSON."""
    import ray
    import torch

    from fpc_ray.bench.train_speed import plain_loop_images_per_s
    from fpc_ray.cluster import init_ray

    cores = os.cpu_count() or 1
    cfg = cfg.model_copy(deep=True)
    cfg.train.frozen_epochs = 0
    cfg.train.num_workers = 1
    cfg.train.cpus_per_worker = float(cores)
    mb = 2**20
    with tempfile.TemporaryDirectory(prefix="fpc-bench-ingest-") as tmp:
        scaled = scaled_copy(cfg, data_uri, scale, os.path.join(tmp, f"data-x{scale}"))
        init_ray()
        cluster = ray.get_runtime_context().gcs_address
        # Ray Data forced at 1x: what the arrays path saves on small data.
        forced = cfg.data.cache if cfg.data.cache in ("memory", "stream") else "memory"
        runs = {}
        for name, data, cache in (("1x", data_uri, cfg.data.cache), (f"{scale}x", scaled, cfg.data.cache),
                                  ("1x-ray-data", data_uri, forced)):
            runs[name] = _train_in_subprocess(cfg, data, os.path.join(tmp, f"bundle-{name}"), cluster, cache)
        ray.shutdown()  # the plain loop runs without Ray's daemons, as it would in real life
        torch.set_num_threads(cores)
        plain = plain_loop_images_per_s(cfg, scaled)
    (base, base_history, base_out), (big, history, big_out) = runs["1x"], runs[f"{scale}x"]
    _, forced_history, forced_out = runs["1x-ray-data"]
    ours, base_rate, forced_rate = _images_per_s(history), _images_per_s(base_history), _images_per_s(forced_history)
    result = {
        "scale": scale,
        "ingest": {"1x": _ingest(base_out), f"{scale}x": _ingest(big_out)},
        "driver_uss_mb": {"1x": round(base["driver"] / mb, 1), f"{scale}x": round(big["driver"] / mb, 1)},
        "worker_uss_mb": {"1x": round(base["worker"] / mb, 1), f"{scale}x": round(big["worker"] / mb, 1)},
        "driver_rss_ratio": round(big["driver"] / max(base["driver"], 1), 3),
        "worker_rss_ratio": round(big["worker"] / max(base["worker"], 1), 3),
        "ours_images_per_s": round(ours, 2),
        "plain_images_per_s": round(plain, 2),
        "train_ratio": round(ours / plain, 3),
        "images_per_s_1x": {_ingest(base_out): round(base_rate, 2), f"{_ingest(forced_out)} (forced)":
                            round(forced_rate, 2)},
        "forced_ray_data_over_auto_1x": round(forced_rate / max(base_rate, 1e-9), 3),
    }
    return [
        f"setup: {cfg.model.backbone}, {cfg.data.image_size} px, batch {cfg.train.batch_size}, "
        f"{cfg.train.epochs} epochs (first is warm-up), 1 worker x {cores} CPUs, data x1 and x{scale}",
        f"1x:  {_ingest_line(base_out)}",
        f"{scale}x: {_ingest_line(big_out)}",
        f"driver peak USS   {result['driver_uss_mb']['1x']:8.1f} MB -> {result['driver_uss_mb'][f'{scale}x']:8.1f} MB"
        f"  ratio {result['driver_rss_ratio']:.3f} (target <= 1.2)",
        f"worker peak USS   {result['worker_uss_mb']['1x']:8.1f} MB -> {result['worker_uss_mb'][f'{scale}x']:8.1f} MB"
        f"  ratio {result['worker_rss_ratio']:.3f} (target <= 1.3)",
        f"training on x{scale}: fpc-ray {ours:.1f} images/s, plain in-memory PyTorch {plain:.1f} images/s"
        f"  ratio {result['train_ratio']:.3f} (target >= 0.9)",
        f"training on x1: {_ingest(base_out)} (auto's path) {base_rate:.1f} images/s, Ray Data forced "
        f"({_ingest(forced_out)}) {forced_rate:.1f} images/s  ratio {result['forced_ray_data_over_auto_1x']:.3f}",
        json.dumps(result),
    ]
