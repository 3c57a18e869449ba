"""`fpc-ray bench gpu`: the node's ceilings beside fpc-ray's own figures, measured in one run.

On the node it runs on, the bench measures what the node can do (decode on every core, nvJPEG,
the model's inference and training step: :mod:`fpc_ray.bench.ceilings`) and what fpc-ray does
with it (labelling a PNG archive and a DICOM JPEG Baseline cine archive with GradCAM, in steady
state and end to end; ``fpc-ray train`` images/s per epoch after the first), then prints each
ratio beside its target. Sizes default to a 16-core 1-GPU node (about 8 minutes, start-up
included) where CUDA is present and to a quick run on a CPU-only machine.

Steady state is the difference of two runs of the same setting, a slice (``--limit``) and the
whole archive: (rows_all - rows_slice) / (label_s_all - label_s_slice), which cancels the actors'
start-up and the commit. End to end is rows over the whole ``run_labelling`` call (listing,
actors' start-up, labelling, commit) on a Ray cluster that is already up, as a nightly job
submitted to a running cluster sees it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from fpc_ray.bench import archives, ceilings
from fpc_ray.errors import UserError


@dataclass(frozen=True)
class GpuBenchSizes:
    """How big each part of the bench is."""

    frames: int  # per archive (PNG, and DICOM cine)
    slice_frames: int  # the shorter run that steady state is measured against
    per_cine: int  # frames per DICOM cine loop
    pool: int  # distinct phantom frames the archives are built from
    image_size: int
    infer_batch: int
    label_batch: int  # objects per decode task (a GPU predictor still takes 512 frames a pass)
    train_batch: int
    train_images: int
    epochs: int
    train_workers: int  # Ray Train workers of the training run (0: in-process, for quick CPU runs)
    compile_ceiling: bool  # also measure torch.compile'd inference (a minute of compiling on a GPU)

    @classmethod
    def for_device(cls, cuda: bool) -> GpuBenchSizes:
        if cuda:  # a 16-core 1-GPU node in about 8 minutes, start-up included
            return cls(frames=20_000, slice_frames=5_000, per_cine=100, pool=300, image_size=224,
                       infer_batch=1024, label_batch=64, train_batch=256, train_images=12_000, epochs=3,
                       train_workers=1, compile_ceiling=True)
        return cls(frames=240, slice_frames=80, per_cine=20, pool=24, image_size=96, infer_batch=64,
                   label_batch=32, train_batch=32, train_images=240, epochs=2, train_workers=1,
                   compile_ceiling=False)


@dataclass
class Figures:
    """Every figure of one run, in images (frames) per second unless named otherwise."""

    device: str
    cores: int
    sizes: dict
    ceilings: dict = dataclasses.field(default_factory=dict)
    label: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU only ({platform.processor() or platform.machine()})"


def _model():
    from fpc_ray.config import ModelConfig
    from fpc_ray.data.fetal_planes import CLASS_NAMES
    from fpc_ray.model import build_model

    return build_model(ModelConfig(pretrained="none"), len(CLASS_NAMES), pretrained=False)


def measure_ceilings(fig: Figures, sizes: GpuBenchSizes, png_dir: str, jpeg_dir: str, echo) -> None:
    """The node's own ceilings, into ``fig.ceilings``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pngs = sorted(os.path.join(png_dir, f) for f in os.listdir(png_dir))
    jpegs = sorted(os.path.join(jpeg_dir, f) for f in os.listdir(jpeg_dir))
    c = fig.ceilings
    decode = ceilings.cpu_decode_per_s({"png": pngs, "jpeg": jpegs}, sizes.image_size)
    c["png_decode"], c["jpeg_decode"] = decode["png"], decode["jpeg"]
    c["nvjpeg"] = ceilings.nvjpeg_per_s(jpegs, sizes.image_size)
    echo(f"  decode on {fig.cores} cores: PNG {c['png_decode']:.0f}/s, JPEG {c['jpeg_decode']:.0f}/s, nvJPEG "
         + (f"{c['nvjpeg']:.0f}/s" if c["nvjpeg"] else "n/a (no CUDA)"))
    c["inference"], _ = ceilings.inference_per_s(_model(), sizes.infer_batch, sizes.image_size, device)
    if sizes.compile_ceiling:
        c["inference_compiled"], c["compile_s"] = ceilings.inference_per_s(
            _model(), sizes.infer_batch, sizes.image_size, device, compile_model=True)
    c["train_step"] = ceilings.train_step_per_s(_model(), sizes.train_batch, sizes.image_size, device)
    echo(f"  model: inference {c['inference']:.0f}/s (batch {sizes.infer_batch})"
         + (f", compiled {c['inference_compiled']:.0f}/s" if "inference_compiled" in c else "")
         + f", training step {c['train_step']:.0f}/s (batch {sizes.train_batch})")


def _label_once(bundle: str, src: str, out: str, cam: str, sizes: GpuBenchSizes, limit: int | None,
                jpeg_on_gpu: bool | None = None) -> dict:
    """One in-process labelling run: rows, the label stage's seconds, the whole call's seconds."""
    from fpc_ray.label.pipeline import LabelOptions, run_labelling

    opts = LabelOptions(run_id="bench", cam=cam, batch_size=sizes.label_batch, use_gpu=torch.cuda.is_available(),
                        limit=limit, max_error_rate=0.0, jpeg_on_gpu=jpeg_on_gpu)
    t0 = time.perf_counter()
    summary = run_labelling(bundle, src, out, opts, echo=lambda _: None)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": summary["rows"], "label_s": summary["timings"]["label_s"], "wall_s": wall}


def label_rates(bundle: str, src: str, workdir: str, cam: str, sizes: GpuBenchSizes, frames_per_object: int = 1,
                jpeg_on_gpu: bool | None = None) -> dict:
    """Steady-state and end-to-end frames/s of labelling ``src`` (see the module's docstring).
    The slice is a count of objects (``--limit``): ``frames_per_object`` turns frames into loops."""
    slice_objects = max(1, sizes.slice_frames // frames_per_object)
    part = _label_once(bundle, src, os.path.join(workdir, f"out-{cam}-slice"), cam, sizes, slice_objects, jpeg_on_gpu)
    whole = _label_once(bundle, src, os.path.join(workdir, f"out-{cam}-all"), cam, sizes, None, jpeg_on_gpu)
    extra_rows, extra_s = whole["rows"] - part["rows"], whole["label_s"] - part["label_s"]
    steady = extra_rows / extra_s if extra_rows > 0 and extra_s > 0 else whole["rows"] / whole["label_s"]
    return {"rows": whole["rows"], "steady": steady, "end_to_end": whole["rows"] / whole["wall_s"],
            "wall_s": whole["wall_s"]}


def train_rate(data_dir: str, workdir: str, sizes: GpuBenchSizes) -> tuple[str, dict]:
    """``fpc-ray train`` (one Ray worker by default, the GPU where there is one): the bundle it wrote and its
    images/s per epoch after the first (the first pays warm-up and, with a frozen backbone,
    different work: freezing is off so every epoch does the same)."""
    from fpc_ray.config import load_config
    from fpc_ray.train.driver import run_training

    cuda = torch.cuda.is_available()
    cfg = load_config(None, None, {
        "model.pretrained": "none", "data.image_size": sizes.image_size, "train.batch_size": sizes.train_batch,
        "train.epochs": sizes.epochs, "train.frozen_epochs": 0, "train.num_workers": sizes.train_workers,
        "train.use_gpu": cuda, "train.cpus_per_worker": max(1, (os.cpu_count() or 2) // 2),
        "data.decode_threads": os.cpu_count() or 4,
    })
    bundle = os.path.join(workdir, "bundle")
    history = run_training(cfg, data_dir, bundle).history
    later = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    per_epoch = [round(h["images_per_s"], 1) for h in history]
    return bundle, {"per_epoch": per_epoch, "images_per_s": sum(later) / len(later)}


def build_archives(workdir: str, sizes: GpuBenchSizes, echo) -> dict[str, str]:
    """The phantom archives and the training dataset under ``workdir``."""
    from fpc_ray.data.synth import synthesize

    t0 = time.perf_counter()
    pool = archives.phantom_pool(sizes.pool)
    paths = {
        "png": archives.png_archive(pool, sizes.frames, os.path.join(workdir, "png")),
        "jpeg": archives.jpeg_archive(pool, min(sizes.frames, 4000), os.path.join(workdir, "jpeg")),
        "cine": archives.dicom_cine_archive(pool, sizes.frames, sizes.per_cine, os.path.join(workdir, "cine")),
    }
    seed_set = os.path.join(workdir, "train-seed")
    synthesize(seed_set, per_class=max(6, sizes.pool // 6), seed=1, width=archives.FRAME_WIDTH,
               height=archives.FRAME_HEIGHT)
    paths["train"] = archives.expand_dataset(seed_set, os.path.join(workdir, "train"), sizes.train_images)
    echo(f"  archives: {sizes.frames} PNG frames, {sizes.frames} DICOM JPEG cine frames "
         f"({sizes.per_cine} per loop), {sizes.train_images} training images, in {time.perf_counter() - t0:.0f}s")
    return paths


def run_benchmark(sizes: GpuBenchSizes, workdir: str, echo=print) -> Figures:
    """Build the archives, measure the ceilings, train, label; every figure in one :class:`Figures`."""
    from fpc_ray.cluster import init_ray

    started = time.perf_counter()
    fig = Figures(device=_device_name(), cores=os.cpu_count() or 1, sizes=dataclasses.asdict(sizes))
    echo(f"bench gpu on {fig.device}, {fig.cores} cores, torch {torch.__version__}")
    paths = build_archives(workdir, sizes, echo)
    measure_ceilings(fig, sizes, paths["png"], paths["jpeg"], echo)
    init_ray()
    bundle, fig.train = train_rate(paths["train"], workdir, sizes)
    echo(f"  fpc-ray train: {fig.train['images_per_s']:.0f} images/s after the first epoch ({fig.train['per_epoch']})")
    # The first labelling run starts the cluster's CPU workers (each imports torch, OpenCV, Ray
    # Data) and later runs reuse them: paid here, so neither run of a steady-state pair pays it.
    _label_once(bundle, paths["png"], os.path.join(workdir, "out-warm-up"), "none", sizes, sizes.label_batch)
    jpeg_on_gpu = None if fig.ceilings.get("nvjpeg") or not torch.cuda.is_available() else False
    for name, src, cams, per_object in (("png", paths["png"], ("gradcam", "none"), 1),
                                        ("cine", paths["cine"], ("gradcam",), sizes.per_cine)):
        for cam in cams:
            rates = label_rates(bundle, src, workdir, cam, sizes, per_object, jpeg_on_gpu)
            fig.label[f"{name}_{cam}"] = rates
            echo(f"  fpc-ray label {name} --cam {cam}: {rates['rows']} frames, steady {rates['steady']:.0f}/s, "
                 f"end to end {rates['end_to_end']:.0f}/s")
    fig.wall_s = time.perf_counter() - started
    return fig


def ratio_lines(fig: Figures) -> list[str]:
    """Each target of issue 13 as ``name  figure / reference = ratio  (target: met|NOT met)``."""
    c, lab, tr = fig.ceilings, fig.label, fig.train
    png, cine, png_none = lab["png_gradcam"], lab["cine_gradcam"], lab["png_none"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    rows = [
        ("label PNG steady / PNG decode ceiling", png["steady"], c["png_decode"], 0.8),
        ("label PNG end to end / steady", png["end_to_end"], png["steady"], 0.7),
        ("label cine end to end / steady", cine["end_to_end"], cine["steady"], 0.7),
        ("train images/s / training-step ceiling", tr["images_per_s"], c["train_step"], 0.7),
        ("label gradcam / no CAM (PNG, steady)", png["steady"], png_none["steady"], 0.9),
    ]
    lines = [f"{name:42s} {a:9.0f} / {b:9.0f} = {a / b:6.3f}  (target >= {t}: {verdict(a / b >= t)})"
             for name, a, b, t in rows]
    lines.append(f"{'label cine steady (frames/s)':42s} {cine['steady']:9.0f}              "
                 f"(target >= 5000 on an H100/H200 node: {verdict(cine['steady'] >= 5000)})")
    lines.append(f"{'label cine steady / CPU JPEG decode ceiling':42s} {cine['steady']:9.0f} / {c['jpeg_decode']:9.0f}"
                 f" = {cine['steady'] / c['jpeg_decode']:6.3f}"
                 + (f"; / nvJPEG {c['nvjpeg']:.0f} = {cine['steady'] / c['nvjpeg']:.3f}" if c.get("nvjpeg") else ""))
    lines.append(f"{'inference ceiling (for reference)':42s} {c['inference']:9.0f}"
                 + (f"; compiled {c['inference_compiled']:.0f} (compile {c['compile_s']:.0f}s)"
                    if "inference_compiled" in c else ""))
    lines.append(f"whole bench: {fig.wall_s:.0f}s on {fig.device}, {fig.cores} cores")
    return lines


def run_and_report(sizes: GpuBenchSizes, workdir: str | None, json_path: str | None, echo=print) -> list[str]:
    """The CLI's body: run in ``workdir`` (default a temporary folder, removed after), print the
    ratios, and write every figure to ``json_path`` when given."""
    if workdir and os.path.isdir(workdir) and os.listdir(workdir):
        # Its archives are hard links and its bundle refuses to be overwritten: a rerun would fail
        # minutes in. Emptying a folder the user named is not ours to do.
        raise UserError(f"--workdir {workdir}: not empty; give a new or empty folder")
    tmp = None if workdir else tempfile.mkdtemp(prefix="fpc-bench-gpu-")
    try:
        fig = run_benchmark(sizes, workdir or tmp, echo)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = ratio_lines(fig)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**dataclasses.asdict(fig), "ratios": lines}, f, indent=2)
    return lines
