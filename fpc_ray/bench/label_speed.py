"""Labelling benchmarks, measured in one run on this machine.

(a) ``fpc-ray label`` images/s with ``--cam gradcam`` over ``--cam none``;
(b) end-to-end ``fpc-ray label`` images/s over a bare single-process loop doing the same read,
    decode, preprocess, forward, CAM and thumbnail on the same cores;
(c) peak memory (PSS) of all Ray processes labelling 10x the images over 1x.

Rates are the best of ``repeats`` rounds, each round running every contender once: a shared VM
slows single runs by up to 10 % at random, and the fastest run is the closest to each one's
true cost (as ``timeit`` reports). Every label run is a whole run, actor start-up included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import torch

from fpc_ray.bundle import load_bundle
from fpc_ray.data.transforms import eval_transform, letterbox
from fpc_ray.label.cam import predict_with_gradcam
from fpc_ray.label.decode import decode_object
from fpc_ray.label.pipeline import LabelOptions, list_objects, run_labelling
from fpc_ray.label.predictor import cam_thumbnail
from fpc_ray.storage import resolve


def _pss_kib(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_processes_pss_mib(include_self: bool = True) -> float:
    """PSS (shared pages split fairly) of every Ray process on this machine, plus this driver."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (include_self and pid == str(os.getpid())) or b"ray::" in cmd or b"raylet" in cmd or b"gcs_server" in cmd \
                or b"ray/dashboard" in cmd or b"ray/_private" in cmd:
            total += _pss_kib(pid)
    return total / 1024


def wait_for_ray_exit(timeout_s: float = 30.0) -> None:
    """After ``ray.shutdown()``: until this machine's Ray processes are gone (they take a few
    seconds to exit, and would share the cores with what is measured next)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and ray_processes_pss_mib(include_self=False) > 0:
        time.sleep(0.2)


class PeakSampler:
    """Samples :func:`ray_processes_pss_mib` in a thread while enabled; ``peak`` after exit."""

    def __init__(self, every: float = 0.25, enabled: bool = True):
        self.every, self.peak, self.enabled = every, 0.0, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, ray_processes_pss_mib())
            time.sleep(self.every)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


def bare_loop_images_per_s(model_uri: str, input_uri: str, batch_size: int = 32, thumb: int = 128) -> float:
    """Load the model, then read, decode, letterbox, normalise, forward + GradCAM and thumbnail
    PNG, in one process (whose imports are done, as a long-running script's would be)."""
    t0, done = time.perf_counter(), 0
    bundle = load_bundle(model_uri)
    model, size = bundle.model.eval(), bundle.card["input"]["size"]
    transform = eval_transform(bundle.card["input"]["mean"], bundle.card["input"]["std"])
    objects = list_objects(resolve(input_uri))
    pending = []

    def flush():
        nonlocal done
        batch = torch.stack([transform(image=letterbox(g, size))["image"] for g, _ in pending])
        _, cams = predict_with_gradcam(model, batch)
        for (gray, small), cam in zip(pending, cams.numpy(), strict=False):
            cam_thumbnail(cam, small, gray.shape[1], gray.shape[0], size)
        done += len(pending)
        pending.clear()

    import cv2

    for obj in objects:
        loc = resolve(obj["uri"])
        for _, gray in decode_object(obj["uri"], loc.read_bytes()).frames:
            h, w = gray.shape
            s = thumb / max(h, w)
            pending.append((gray, cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                                             interpolation=cv2.INTER_AREA)))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return done / (time.perf_counter() - t0)


def _archive(src_images: list[str], n: int, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    for i in range(n):
        src = src_images[i % len(src_images)]
        # Distinct names and sizes keep every object new to the labeller.
        shutil.copyfile(src, os.path.join(dest, f"img{i:06d}.png"))
    return dest


def run_benchmark(model_uri: str, data_dir: str, images: int = 2000, batch_size: int = 32,
                  repeats: int = 3) -> list[str]:
    """Run (a), (b) and (c) and return the report lines."""
    import ray

    from fpc_ray.train.driver import init_ray

    torch.set_num_threads(os.cpu_count() or 1)
    pngs = sorted(os.path.join(data_dir, "Images", f) for f in os.listdir(os.path.join(data_dir, "Images")))
    tmp = tempfile.mkdtemp(prefix="fpc-bench-label-")
    quiet = lambda *_: None  # noqa: E731
    rates: dict[str, list[float]] = {"none": [], "gradcam": [], "bare": []}
    big_peak, small_peak = 0.0, 0.0
    try:
        big = _archive(pngs, images, os.path.join(tmp, "big"))
        small = _archive(pngs, max(1, images // 10), os.path.join(tmp, "small"))

        def label(src: str, cam: str, sample_memory: bool = False) -> tuple[float, float]:
            out = tempfile.mkdtemp(dir=tmp)
            with PeakSampler(enabled=sample_memory) as mem:
                t0 = time.perf_counter()
                s = run_labelling(model_uri, src, out, LabelOptions(cam=cam, batch_size=batch_size), echo=quiet)
                wall = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return s["rows"] / wall, mem.peak

        for _ in range(repeats):
            init_ray()
            label(small, "none")  # warm-up: the first run of a session pays Ray Data's one-time set-up
            for cam in ("none", "gradcam"):
                rates[cam].append(label(big, cam)[0])
            if not small_peak:  # memory is sampled in runs of its own: sampling costs CPU
                small_peak, big_peak = label(small, "gradcam", True)[1], label(big, "gradcam", True)[1]
            ray.shutdown()  # the bare loop runs without Ray's daemons, as it would in real life
            wait_for_ray_exit()
            rates["bare"].append(bare_loop_images_per_s(model_uri, big, batch_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    none_rate, cam_rate, bare = (max(rates[k]) for k in ("none", "gradcam", "bare"))
    a, b, c = cam_rate / none_rate, cam_rate / bare, big_peak / small_peak
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    runs = lambda k: ", ".join(f"{r:.1f}" for r in rates[k])  # noqa: E731
    return [
        f"setup: {images} images (1x = {max(1, images // 10)}), batch {batch_size}, {os.cpu_count()} cores, "
        f"best of {repeats} rounds",
        f"fpc-ray label --cam none      {none_rate:8.1f} images/s  ({runs('none')})",
        f"fpc-ray label --cam gradcam   {cam_rate:8.1f} images/s  ({runs('gradcam')})",
        f"bare single-process loop      {bare:8.1f} images/s  ({runs('bare')})",
        f"peak PSS of Ray processes     {small_peak:8.0f} MiB at 1x, {big_peak:.0f} MiB at 10x",
        f"(a) gradcam / none            {a:8.3f}  (target >= 0.85: {verdict(a >= 0.85)})",
        f"(b) fpc-ray label / bare      {b:8.3f}  (target >= 0.8: {verdict(b >= 0.8)})",
        f"(c) memory 10x / 1x           {c:8.3f}  (target <= 1.2: {verdict(c <= 1.2)})",
    ]
