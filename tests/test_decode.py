"""Every input kind the labeller must decode, and every way an object can be broken."""

import numpy as np
import pytest

from fpc_ray.label.decode import DecodeError, decode_object
from tests import fixtures_archive as fx

GRAY = (np.add.outer(np.arange(48), np.arange(64)) * 2 % 256).astype(np.uint8)


def _close(a, b, tol=3):
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= tol


def test_dicom_mono_keeps_uids_and_drops_identifiers():
    out = decode_object("s3://a/study/IM0001", fx.dicom_mono(GRAY))  # no extension: DICM magic
    assert len(out.frames) == 1
    _close(out.frames[0][1], GRAY, 0)
    assert all(out.uids[k] for k in ("study_uid", "series_uid", "sop_uid"))
    assert set(out.uids) == {"study_uid", "series_uid", "sop_uid"}


@pytest.mark.parametrize("make", [fx.dicom_rle, fx.dicom_j2k, fx.dicom_big_endian_16bit, fx.dicom_palette])
def test_dicom_transfer_syntaxes_and_photometrics(make):
    out = decode_object("x.dcm", make(GRAY))
    _close(out.frames[0][1], GRAY, 2)


def test_multiframe_rgb_and_jpeg_cine_with_stride():
    frames = [np.roll(GRAY, k, axis=1) for k in range(5)]
    out = decode_object("cine.dcm", fx.dicom_rgb_multiframe(frames), frame_stride=2)
    assert [i for i, _ in out.frames] == [0, 2, 4]
    _close(out.frames[1][1], frames[2], 1)
    out = decode_object("cine", fx.dicom_jpeg_ybr_cine(frames))
    assert [i for i, _ in out.frames] == [0, 1, 2, 3, 4]
    _close(out.frames[3][1], frames[3], 12)  # lossy JPEG


@pytest.mark.parametrize(("name", "data", "kind"), [
    ("empty.png", b"", "empty"),
    ("notes.txt", b"just some text", "not_an_image"),
    ("cut.png", fx.png(GRAY)[:60], "truncated"),
    ("nopixels", fx.dicom_without_pixels(), "no_pixels"),
    ("cut.dcm", fx.dicom_mono(GRAY)[:-500], "truncated"),
    ("bomb.png", fx.png_bomb(), "too_large"),
    ("clip.dcm", fx.dicom_mpeg2_video(), "unsupported"),
])
def test_broken_objects_get_a_kind(name, data, kind):
    with pytest.raises(DecodeError) as err:
        decode_object(name, data)
    assert err.value.kind == kind


def test_raster_formats():
    _close(decode_object("a.png", fx.png(GRAY)).frames[0][1], GRAY, 0)
    _close(decode_object("a.jpg", fx.jpeg(GRAY)).frames[0][1], GRAY, 8)
    rgba = np.concatenate([np.stack([GRAY] * 3, -1), np.full((48, 64, 1), 255, np.uint8)], -1)
    _close(decode_object("a.png", fx.png(rgba)).frames[0][1], GRAY, 1)
    _close(decode_object("a.png", fx.png(GRAY.astype(np.uint16) * 257)).frames[0][1], GRAY, 1)
