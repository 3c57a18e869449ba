"""The split labelling design (CPU decode tasks -> predictors -> CPU overlay tasks): the same rows
as the one-stage design, JPEG frames decoded in batches by torchvision to the CPU path's pixels
(on the CPU here; on CUDA where there is one), calibrated probabilities in both designs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, UltrasoundImageStorage

from fpc_ray.bundle import read_card
from fpc_ray.data.fetal_planes import read_fetal_planes
from fpc_ray.data.transforms import letterbox
from fpc_ray.label.decode import Codestream, DecodeError, decode_object
from fpc_ray.label.frames import ReadDecode, thumbnail
from fpc_ray.label.pipeline import LabelOptions, run_labelling
from fpc_ray.label.schema import LABEL_SCHEMA
from fpc_ray.label.split import decode_codestreams
from fpc_ray.label.torch_frames import decode_jpegs, letterbox_frames, thumbnail_frames
from tests import fixtures_archive as fx

INPUT, THUMB = 96, 64
# JPEG decoders may round the IDCT and chroma upsampling differently (libjpeg-turbo's islow
# against nvJPEG's): the most a letterboxed frame may differ from the CPU path's, in gray levels.
MEAN_TOLERANCE, MAX_TOLERANCE = 2.0, 24


@pytest.fixture(scope="module")
def gray(phantom_dir) -> np.ndarray:
    """A phantom frame enlarged to a scanner's 800x600: letterboxing shrinks it, as in real use."""
    db = read_fetal_planes(phantom_dir)
    small = np.asarray(Image.open(io.BytesIO(db.image_location(db.records[0]).read_bytes())).convert("L"))
    return cv2.resize(small, (800, 600), interpolation=cv2.INTER_CUBIC)


def _rgb_jpeg(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.dstack([gray, np.roll(gray, 7, axis=1), 255 - gray])).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _progressive_jpeg(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=90, progressive=True)
    return buf.getvalue()


def _dicom_mono_jpeg(gray: np.ndarray, window: bool = False) -> bytes:
    """JPEG Baseline MONOCHROME2, one frame; with a window, whose gray values the window changes."""
    ds = fx._base(UltrasoundImageStorage, *gray.shape)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    if window:
        ds.WindowCenter, ds.WindowWidth = 100, 120
    return fx._bytes(ds)


def _archive(gray: np.ndarray) -> dict[str, bytes]:
    small = cv2.resize(gray, (192, 144), interpolation=cv2.INTER_AREA)
    return {"gray.jpg": fx.jpeg(gray), "rgb.jpg": _rgb_jpeg(gray),
            "cine.dcm": fx.dicom_jpeg_ybr_cine([np.roll(small, 9 * k, axis=1) for k in range(3)]),
            "small.jpg": fx.jpeg(small[:60, :50])}  # smaller than the input: enlarged, not shrunk


def _rows(name: str, data: bytes, tmp_path: Path, keep_jpeg: bool) -> list[dict]:
    path = tmp_path / name
    path.write_bytes(data)
    return ReadDecode(None, INPUT, THUMB, 1, keep_jpeg=keep_jpeg).frames(str(path), len(data))


def _assert_close(ours: np.ndarray, cpu: np.ndarray) -> None:
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - cpu.astype(np.int16))
    assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())


def _decoded_like_the_cpu_path(tmp_path: Path, gray: np.ndarray, device: torch.device) -> None:
    for name, data in _archive(gray).items():
        kept, cpu = _rows(name, data, tmp_path, True), _rows(name, data, tmp_path, False)
        assert [r["frame"] for r in kept] == [r["frame"] for r in cpu] and all(r["jpeg"] for r in kept), name
        if device.type == "cuda":  # nvJPEG itself decoded them: no frame went to the CPU fallback
            assert all(t is not None and t.is_cuda for t in decode_jpegs([r["jpeg"] for r in kept], device)), name
        done = decode_codestreams([r["jpeg"] for r in kept], [(r["height"], r["width"]) for r in kept], device,
                                  INPUT, THUMB)
        for (pixels, thumb), row in zip(done, cpu, strict=True):
            _assert_close(pixels, row["pixels"])
            _assert_close(thumb, row["thumb"])


def test_jpeg_frames_decoded_in_batches_are_the_cpu_paths_pixels(tmp_path, gray):
    """torchvision's CPU decoder: the code the GPU predictors run, on the CPU (JPEG gray and RGB
    files, a DICOM JPEG Baseline YBR cine, a frame smaller than the input)."""
    _decoded_like_the_cpu_path(tmp_path, gray, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_jpeg_frames_decoded_by_nvjpeg_are_the_cpu_paths_pixels(tmp_path, gray):
    _decoded_like_the_cpu_path(tmp_path, gray, torch.device("cuda"))


def test_a_frame_the_batched_decoder_refuses_goes_to_the_cpu_decoder(tmp_path, gray):
    data = fx.jpeg(gray)
    (cpu,) = _rows("a.jpg", data, tmp_path, False)
    # A decoded size other than the header's is refused, as nvJPEG's refusals are: the CPU
    # decoder decodes it, to the CPU path's very pixels. A cut-off codestream is its error row.
    good, cut = decode_codestreams([data, data[:len(data) // 2]], [(601, 800), (600, 800)], torch.device("cpu"),
                                   INPUT, THUMB)
    np.testing.assert_array_equal(good[0], cpu["pixels"])
    np.testing.assert_array_equal(good[1], cpu["thumb"])
    assert cut.startswith("truncated: ")


@pytest.mark.parametrize("h,w,size", [(600, 800, 224), (144, 192, 64), (100, 90, 224), (37, 1000, 96), (5, 3, 96)])
def test_torch_letterbox_is_opencvs(h, w, size):
    frame = np.random.default_rng(h * w).integers(0, 256, (h, w), dtype=np.uint8)
    ours = letterbox_frames(torch.from_numpy(frame).float()[None], size)[0].numpy()
    diff = np.abs(ours.astype(np.int16) - letterbox(frame, size))
    assert diff.max() <= (0 if size < max(h, w) else 1)  # INTER_AREA exactly; INTER_LINEAR's 11-bit weights
    small, _, _ = thumbnail_frames(torch.from_numpy(frame).float()[None], 64)
    diff = np.abs(small[0].numpy().astype(np.int16) - thumbnail(frame, 64))
    assert diff.max() <= (0 if 64 <= max(h, w) else 1)  # INTER_AREA enlarging: also 11-bit weights


def test_only_jpegs_a_batched_decoder_takes_stay_encoded(gray):
    def kept(name, data):
        decoded = decode_object(name, data, keep_jpeg=True)
        return decoded.kind, [isinstance(f, Codestream) for _, f in decoded.frames]

    small = gray[:64, :80]
    assert kept("a.jpg", fx.jpeg(small)) == ("jpeg", [True])
    assert kept("a.jpg", _rgb_jpeg(small)) == ("jpeg", [True])
    assert kept("a.jpg", _progressive_jpeg(small)) == ("jpeg", [False])
    assert kept("a.png", fx.png(small)) == ("png", [False])
    assert kept("c.dcm", fx.dicom_jpeg_ybr_cine([small, small])) == ("dicom_cine", [True, True])
    assert kept("m.dcm", _dicom_mono_jpeg(small)) == ("dicom", [True])
    assert kept("w.dcm", _dicom_mono_jpeg(small, window=True)) == ("dicom", [False])  # the window needs the CPU
    assert kept("n.dcm", fx.dicom_mono(small)) == ("dicom", [False])
    assert kept("r.dcm", fx.dicom_rgb_multiframe([small] * 3)) == ("dicom_cine", [False] * 3)
    with pytest.raises(DecodeError, match="^truncated: "):  # cut off before its end: the CPU decoder's, and error
        decode_object("a.jpg", fx.jpeg(small)[:-40], keep_jpeg=True)
    assert decode_object("a.jpg", fx.jpeg(small)).kind == "jpeg"  # the kind without keep_jpeg too


def test_every_frame_row_says_what_kind_of_input_it_came_from(tmp_path, gray):
    small = gray[:64, :80]
    kinds = {"a.png": (fx.png(small), ["png"]), "a.jpg": (fx.jpeg(small), ["jpeg"]),
             "m.dcm": (fx.dicom_mono(small), ["dicom"]), "c.dcm": (fx.dicom_jpeg_ybr_cine([small] * 2),
                                                                   ["dicom_cine"] * 2),
             "bad.png": (b"\x89PNG", [None])}
    for name, (data, expected) in kinds.items():
        assert [r["input_kind"] for r in _rows(name, data, tmp_path, False)] == expected, name


# With the session's trained bundle: in-process (no Ray), then through the session's cluster.

def _calibrated_copy(bundle: str, tmp_path: Path, temperature: float) -> str:
    out = tmp_path / f"bundle-t{temperature}"
    shutil.copytree(bundle, out)
    card = json.loads((out / "model.json").read_text())
    card["calibration"] = {"temperature": temperature}
    (out / "model.json").write_text(json.dumps(card))
    return str(out)


def _split_in_process(model: str, uris: list[str], cam: str, keep_jpeg: bool) -> list[dict]:
    """The three stages of the split design called one after the other, as Ray Data would."""
    from ray.data.block import BlockAccessor

    from fpc_ray.label.handover import decode_stage, overlay_stage
    from fpc_ray.label.split import SplitPredictor

    def numpy(table):
        return BlockAccessor.for_block(table).to_batch_format("numpy")

    predictor = SplitPredictor(model, None, cam, False, thumb_size=THUMB, frames_per_pass=8)
    size = predictor.classifier.size
    handed = decode_stage({"uri": np.array(uris, object)}, storage=None, input_size=size, thumb_size=THUMB,
                          frame_stride=1, keep_jpeg=keep_jpeg, max_object_bytes=2**30)
    classified = predictor(numpy(handed))
    return overlay_stage(numpy(classified), class_names=predictor.classifier.class_names,
                         version=predictor.classifier.version, run_id="r", input_size=size).to_pylist()


def test_probabilities_are_the_cards_calibrated_softmax_in_both_designs(trained_bundle, tmp_path):
    from fpc_ray.label.predictor import Predictor

    db = read_fetal_planes(trained_bundle["data"])
    uris = [db.image_location(r).uri for r in db.records[:3]]
    hot = _calibrated_copy(trained_bundle["bundle"], tmp_path, 2.5)

    def one_stage(model, cam):
        return Predictor(model, None, cam, False, "r", thumb_size=THUMB)({"uri": np.array(uris, object)}).to_pylist()

    t0 = read_card(trained_bundle["bundle"]).get("calibration", {}).get("temperature", 1.0)  # its own fit
    assert t0 < 2.5
    for cam in ("none", "gradcam", "eigencam"):
        plain, calibrated = one_stage(trained_bundle["bundle"], cam), one_stage(hot, cam)
        for a, b in zip(plain, calibrated, strict=True):
            # softmax(z / 2.5) from softmax(z / t0): the t0 / 2.5 power, renormalised
            expected = np.asarray(a["probabilities"], np.float64) ** (t0 / 2.5)
            np.testing.assert_allclose(b["probabilities"], expected / expected.sum(), atol=1e-5)
            assert a["label"] == b["label"] and b["confidence"] < a["confidence"]
    for a, b in zip(one_stage(hot, "gradcam"), _split_in_process(hot, uris, "gradcam", False), strict=True):
        assert a["label"] == b["label"] and b["gradcam_png"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-4)


def _labelled(output: Path, run_id: str) -> dict[tuple[str, int], dict]:
    table = pads.dataset(output / f"run={run_id}", format="parquet").to_table()
    return {(r["source_uri"], r["frame"]): r for r in table.to_pylist()}


def test_the_split_design_writes_the_one_stage_designs_rows(ray_local, trained_bundle, tmp_path, gray):
    """A mixed archive (phantom PNGs, JPEG files, a DICOM JPEG cine, broken objects) labelled by
    the split design through Ray, JPEG frames decoded by the predictor: the one-stage design's
    rows (its predictor called in-process), labels and errors; UIDs pseudonymized alike; the next
    run finds nothing new."""
    from fpc_ray.label.predictor import Predictor

    db = read_fetal_planes(trained_bundle["data"])
    archive = tmp_path / "archive"
    archive.mkdir()
    for r in db.records[:6]:
        (archive / f"{r.image_name}.png").write_bytes(db.image_location(r).read_bytes())
    for name, data in {**_archive(gray), "broken.png": b"\x89PNG", "empty.jpg": b"",
                       "cut.jpg": fx.jpeg(gray)[:2000]}.items():
        (archive / name).write_bytes(data)
    key = "k" * 32
    uris = np.array(sorted(str(p) for p in archive.iterdir()), object)
    one = Predictor(trained_bundle["bundle"], None, "gradcam", False, "one", uid_key=key)({"uri": uris}).to_pylist()
    opts = LabelOptions(run_id="split", stages="split", jpeg_on_gpu=True, uid_key=key, batch_size=4)
    summary = run_labelling(trained_bundle["bundle"], str(archive), str(tmp_path / "out"), opts)
    split = _labelled(tmp_path / "out", "split")
    assert sorted(split) == sorted((r["source_uri"], r["frame"]) for r in one) and len(one) == 6 + 3 + 3 + 3
    for a in one:
        b = split[(a["source_uri"], a["frame"])]
        assert (a["label"], a["error"], a["study_uid"], a["width"]) == (b["label"], b["error"], b["study_uid"],
                                                                          b["width"]), a["source_uri"]
        assert (a["gradcam_png"] is None) == (b["gradcam_png"] is None) == (a["error"] is not None)
        if a["error"] is None:
            assert abs(a["confidence"] - b["confidence"]) < 0.05, a["source_uri"]
    assert summary["options"]["stages"] == "split" and summary["errors"] == 3
    if "input_kind" in LABEL_SCHEMA.names:  # the column the schema gains: filled in by both designs
        assert {r["input_kind"] for r in split.values()} == {"png", "jpeg", "dicom_cine", None}
    again = run_labelling(trained_bundle["bundle"], str(archive), str(tmp_path / "out"),
                          LabelOptions(run_id="again", stages="split", uid_key=key))
    assert again["objects"]["labelled"] == 0 and again["rows"] == 0
