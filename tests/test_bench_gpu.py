"""`fpc-ray bench gpu`: its phantom archives, its ratios, and one whole run at small sizes on CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fpc_ray.bench import archives
from fpc_ray.bench.gpu import Figures, GpuBenchSizes, ratio_lines, run_and_report
from fpc_ray.data.fetal_planes import read_fetal_planes
from fpc_ray.errors import UserError
from fpc_ray.label.decode import decode_object


@pytest.fixture(scope="module")
def pool():
    return archives.phantom_pool(4, width=160, height=120)


def test_cine_archive_holds_every_frame_as_jpeg_baseline(pool, tmp_path):
    folder = archives.dicom_cine_archive(pool, n_frames=10, per_cine=4, folder=str(tmp_path / "cine"))
    names = sorted(os.listdir(folder))
    assert names == ["cine00000.dcm", "cine00001.dcm", "cine00002.dcm"]  # 4 + 4 + 2 frames
    frames = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        frames += [gray for _, gray in decode_object(name, data).frames]
    assert len(frames) == 10
    # Frame k is pool frame k mod 4, through JPEG at quality 90: close, not equal.
    for k, gray in enumerate(frames):
        assert np.abs(gray.astype(int) - pool[k % 4].gray).mean() < 4


def test_png_and_jpeg_archives_name_every_file_apart(pool, tmp_path):
    png = archives.png_archive(pool, 9, str(tmp_path / "png"))
    jpeg = archives.jpeg_archive(pool, 3, str(tmp_path / "jpeg"))
    assert len(os.listdir(png)) == 9 and len(os.listdir(jpeg)) == 3
    decoded = decode_object("x.png", open(os.path.join(png, "frame000005.png"), "rb").read()).frames[0][1]
    np.testing.assert_array_equal(decoded, pool[5 % 4].gray)  # PNG is lossless


def test_expanded_dataset_keeps_each_copy_with_its_patient(phantom_dir, tmp_path):
    src = read_fetal_planes(phantom_dir)
    out = read_fetal_planes(archives.expand_dataset(phantom_dir, str(tmp_path / "big"), 3 * len(src.records)))
    assert len(out.records) == 3 * len(src.records)
    by_name = {r.image_name: r for r in src.records}
    for r in out.records:
        original = by_name[r.image_name.rsplit("_copy", 1)[0]]
        assert (r.patient, r.plane, r.official_train) == (original.patient, original.plane, original.official_train)


def _figures(png_steady: float, cine_steady: float) -> Figures:
    fig = Figures(device="test", cores=16, sizes={})
    fig.ceilings = {"png_decode": 1000.0, "jpeg_decode": 2000.0, "nvjpeg": None, "inference": 9000.0,
                    "train_step": 500.0}
    fig.label = {"png_gradcam": {"steady": png_steady, "end_to_end": png_steady * 0.75},
                 "png_none": {"steady": png_steady / 0.95, "end_to_end": 0.0},
                 "cine_gradcam": {"steady": cine_steady, "end_to_end": cine_steady * 0.5}}
    fig.train = {"images_per_s": 400.0}
    return fig


def test_ratios_are_each_figure_over_its_reference_with_a_verdict():
    lines = ratio_lines(_figures(png_steady=850.0, cine_steady=6000.0))
    text = "\n".join(lines)
    assert "850 /      1000 =  0.850  (target >= 0.8: met)" in text
    assert "label cine end to end / steady" in text and "=  0.500  (target >= 0.7: NOT met)" in text
    assert "=  0.800  (target >= 0.7: met)" in text  # training 400 / 500
    assert "=  0.950  (target >= 0.9: met)" in text  # gradcam / none
    assert "(target >= 5000 on an H100/H200 node: met)" in text
    low = "\n".join(ratio_lines(_figures(png_steady=500.0, cine_steady=900.0)))
    assert "=  0.500  (target >= 0.8: NOT met)" in low and "H100/H200 node: NOT met" in low


def test_whole_bench_runs_on_cpu_at_small_sizes(ray_local, tmp_path):
    sizes = GpuBenchSizes(frames=24, slice_frames=8, per_cine=6, pool=6, image_size=64, infer_batch=8,
                          label_batch=8, train_batch=8, train_images=60, epochs=2, train_workers=0,
                          compile_ceiling=False)
    out = tmp_path / "bench.json"
    lines = run_and_report(sizes, str(tmp_path / "work"), str(out), echo=lambda _: None)
    figures = json.loads(out.read_text())
    assert figures["label"]["png_gradcam"]["rows"] == 24 and figures["label"]["cine_gradcam"]["rows"] == 24
    assert figures["ceilings"]["nvjpeg"] is None  # no CUDA here
    assert all(figures["ceilings"][k] > 0 for k in ("png_decode", "jpeg_decode", "inference", "train_step"))
    assert len(figures["train"]["per_epoch"]) == 2
    assert any(line.startswith("label PNG steady / PNG decode ceiling") for line in lines)
    assert figures["ratios"] == lines


def test_a_workdir_holding_files_is_refused_before_any_work(tmp_path):
    (tmp_path / "png").mkdir()  # an earlier run's archive: its hard links and bundle would clash
    with pytest.raises(UserError, match="not empty"):
        run_and_report(GpuBenchSizes.for_device(cuda=False), str(tmp_path), None, echo=lambda _: None)
