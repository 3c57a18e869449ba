"""Labelling benchmarks, measured in one run on this machine.

(a) ``fpc-ray label`` images/s with ``--cam gradcam`` over ``--cam none``;
(b) end-to-end ``fpc-ray label`` images/s over a bare single-process loop doing the same read,
    decode, preprocess, forward, CAM and thumbnail on the same cores;
(c) peak memory (PSS) of all Ray processes labelling 10x the images over 1x.

End to end means the same thing on both sides of (b): a fresh process, launched and timed until
it exits. ``fpc-ray label`` is the real command, submitted as the nightly job would be to a Ray
cluster that is already up (a local one started here); the bare loop is ``python -m
fpc_ray.bench.label_speed``, a script that imports what it needs, loads the model and labels.
So each side pays its own imports and model load: the label run in its driver and in its actor,
the loop in its one process. The label stage alone (``_SUCCESS.json``'s ``label_s``) is printed
too.

Rates are the best of ``repeats`` rounds, each round running every contender once: a shared VM
slows single runs by up to 10 % at random, and the fastest run is the closest to each one's
true cost (as ``timeit`` reports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from fpc_ray.bundle import load_bundle, read_card
from fpc_ray.data.transforms import eval_transform
from fpc_ray.errors import RunFailed, UserError
from fpc_ray.label.cam import predict_with_gradcam
from fpc_ray.label.listing import list_objects
from fpc_ray.label.predictor import ReadDecode, cam_thumbnail
from fpc_ray.label.runs import SUCCESS
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
    """PSS (shared pages split fairly) of every Ray process on this machine and of every fpc-ray
    process (the label command's driver, this benchmark's own)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if pid == str(os.getpid()):
            if include_self:
                total += _pss_kib(pid)
        elif any(mark in cmd for mark in (b"ray::", b"raylet", b"gcs_server", b"ray/dashboard", b"ray/_private",
                                          b"fpc-ray", b"fpc_ray")):
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
    PNG each image, in this process, on all its cores: the labelling actor's own read/decode
    (:class:`ReadDecode`) and CAM thumbnail, without Ray, threads or Parquet."""
    t0, done = time.perf_counter(), 0
    bundle = load_bundle(model_uri)
    model, size = bundle.model.eval(), bundle.card["input"]["size"]
    transform = eval_transform(bundle.card["input"]["mean"], bundle.card["input"]["std"])
    reader = ReadDecode(None, size, thumb, frame_stride=1)
    pending = []

    def flush():
        nonlocal done
        batch = torch.stack([transform(image=row["pixels"])["image"] for row in pending])
        _, cams = predict_with_gradcam(model, batch)
        for row, cam in zip(pending, cams.numpy(), strict=True):
            cam_thumbnail(cam, row["thumb"], row["width"], row["height"], size)
        done += len(pending)
        pending.clear()

    for obj in list_objects(resolve(input_uri)):
        pending.extend(row for row in reader.frames(obj["uri"]) if row["error"] is None)
        if len(pending) >= batch_size:
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


def _label_command(model_uri: str, src: str, out: str, cam: str, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "fpc_ray", "label", "--model", model_uri, "--input", src, "--output", out,
            "--cam", cam, "--batch-size", str(batch_size), "--run-id", "bench"]


def _timed(cmd: list[str], env: dict | None = None) -> float:
    """Seconds from launching ``cmd`` to its exit; a failure stops the benchmark."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        last = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise RunFailed(f"benchmark run failed ({' '.join(cmd[2:4])}): {last[0][:300]}")
    return wall


def run_benchmark(model_uri: str, data_dir: str, images: int = 2000, batch_size: int = 32,
                  repeats: int = 3) -> list[str]:
    """Run (a), (b) and (c) and return the report lines."""
    import ray

    from fpc_ray.cluster import init_ray

    images_dir = os.path.join(data_dir, "Images")
    if not os.path.isdir(images_dir) or not os.listdir(images_dir):
        raise UserError(f"{data_dir}: no Images/ folder with images to draw from (try `fpc-ray synth`)")
    read_card(model_uri)  # a bad bundle is one clear line now, not a failed run later
    pngs = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir))
    tmp = tempfile.mkdtemp(prefix="fpc-bench-label-")
    rates: dict[str, list[float]] = {"none": [], "gradcam": [], "bare": [], "stage": []}
    big_peak, small_peak = 0.0, 0.0
    try:
        big = _archive(pngs, images, os.path.join(tmp, "big"))
        small = _archive(pngs, max(1, images // 10), os.path.join(tmp, "small"))

        def label(src: str, cam: str, sample_memory: bool = False) -> tuple[float, float, float]:
            """End-to-end images/s, label-stage images/s and peak PSS of one `fpc-ray label`."""
            out = tempfile.mkdtemp(dir=tmp)
            env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
            with PeakSampler(enabled=sample_memory) as mem:
                wall = _timed(_label_command(model_uri, src, out, cam, batch_size), env)
            with open(os.path.join(out, "run=bench", SUCCESS)) as f:
                summary = json.load(f)
            shutil.rmtree(out, ignore_errors=True)
            return summary["rows"] / wall, summary["rows"] / summary["timings"]["label_s"], mem.peak

        for _ in range(repeats):
            init_ray()
            label(small, "none")  # warm-up: the first job on a fresh cluster pays one-time set-up
            rates["none"].append(label(big, "none")[0])
            rate, stage, _ = label(big, "gradcam")
            rates["gradcam"].append(rate)
            rates["stage"].append(stage)
            if not small_peak:  # memory is sampled in runs of its own: sampling costs CPU
                small_peak, big_peak = label(small, "gradcam", True)[2], label(big, "gradcam", True)[2]
            ray.shutdown()  # the bare loop runs without Ray's daemons, as it would in real life
            wait_for_ray_exit()
            bare_cmd = [sys.executable, "-m", "fpc_ray.bench.label_speed", model_uri, big, str(batch_size)]
            rates["bare"].append(images / _timed(bare_cmd))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(rates, images, batch_size, repeats, small_peak, big_peak)


def _report(rates: dict[str, list[float]], images: int, batch_size: int, repeats: int, small_peak: float,
            big_peak: float) -> list[str]:
    """The report lines of :func:`run_benchmark`: the best rate of each contender, and the targets."""
    none_rate, cam_rate, bare, stage = (max(rates[k]) for k in ("none", "gradcam", "bare", "stage"))
    a, b, c = cam_rate / none_rate, cam_rate / bare, big_peak / small_peak
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    runs = lambda k: ", ".join(f"{r:.1f}" for r in rates[k])  # noqa: E731
    return [
        f"setup: {images} images (1x = {max(1, images // 10)}), batch {batch_size}, {os.cpu_count()} cores, "
        f"best of {repeats} rounds; rates are images/s from launch to exit",
        f"fpc-ray label --cam none      {none_rate:8.1f}  ({runs('none')})",
        f"fpc-ray label --cam gradcam   {cam_rate:8.1f}  ({runs('gradcam')})",
        f"  its label stage alone       {stage:8.1f}  ({runs('stage')})",
        f"bare single-process loop      {bare:8.1f}  ({runs('bare')})",
        f"peak PSS of Ray processes     {small_peak:8.0f} MiB at 1x, {big_peak:.0f} MiB at 10x",
        f"(a) gradcam / none            {a:8.3f}  (target >= 0.85: {verdict(a >= 0.85)})",
        f"(b) fpc-ray label / bare      {b:8.3f}  (target >= 0.8: {verdict(b >= 0.8)})",
        f"(c) memory 10x / 1x           {c:8.3f}  (target <= 1.2: {verdict(c <= 1.2)})",
    ]


if __name__ == "__main__":  # the bare loop of (b), as a script: MODEL INPUT BATCH_SIZE
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{bare_loop_images_per_s(sys.argv[1], sys.argv[2], int(sys.argv[3])):.1f} images/s")
