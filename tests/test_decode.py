"""Every input kind the labeller must decode, and every way an object can be broken."""

import io
import struct

import numpy as np
import pydicom
import pytest

from fpc_ray.label.codestream import deflated_dataset_size, j2k_size, jpeg_size
from fpc_ray.label.decode import DecodeError, decode_object
from fpc_ray.label.schema import error_text
from fpc_ray.label.uids import pseudonymize_uid, valid_uid
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
    ("over_the_limit.png", fx.png_bomb(9000, 8000), "too_large"),  # PIL alone would decode it
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


FRAMES = [np.roll(GRAY, k, axis=1) for k in range(5)]


@pytest.mark.parametrize(("name", "make", "kind"), [
    # each of these once escaped decode_object and killed the labelling batch
    ("nested.dcm", lambda: fx.dicom_nested_sequences(), "malformed"),  # RecursionError in pydicom
    ("odd.dcm", lambda: fx.dicom_odd_length_rows(GRAY), "malformed"),
    ("vr.dcm", lambda: fx.dicom_unknown_vr(GRAY), "malformed"),
    ("palette.dcm", lambda: fx.dicom_palette_without_lut(GRAY), "malformed"),
    # the decoder allocates what the codestream says, not the header: refused before decoding
    ("j2k.dcm", lambda: fx.dicom_codestream_claiming("j2k", 30000, 30000), "too_large"),
    ("jpeg.dcm", lambda: fx.dicom_codestream_claiming("jpeg", 30000, 30000), "too_large"),
    ("j2k.dcm", lambda: fx.dicom_codestream_claiming("j2k", 100, 64), "malformed"),
    ("jpeg.dcm", lambda: fx.dicom_codestream_claiming("jpeg", 64, 100), "malformed"),
    ("huge.dcm", fx.dicom_huge_dimensions, "too_large"),
    ("bomb.jpg", lambda: fx.jpeg_claiming(65000, 65000), "too_large"),
    # Pillow reads these, but each format is one more parser facing the archive
    ("scan.tif", lambda: fx.raster(GRAY, "TIFF"), "not_an_image"),
    ("anim.gif", lambda: fx.raster(GRAY, "GIF"), "not_an_image"),
    ("old.bmp", lambda: fx.raster(GRAY, "BMP"), "not_an_image"),
])
def test_hostile_objects_get_a_kind(name, make, kind):
    with pytest.raises(DecodeError) as err:
        decode_object(name, make())
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{kind}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("jpeg", [False, True])
@pytest.mark.parametrize("declared", [1, 3])
def test_cine_with_more_frames_than_declared_yields_the_declared_frames(jpeg, declared):
    out = decode_object("cine.dcm", fx.dicom_excess_frames(FRAMES, declared, jpeg=jpeg))
    assert [i for i, _ in out.frames] == list(range(declared))
    _close(out.frames[-1][1], FRAMES[declared - 1], 12 if jpeg else 1)


def test_codestream_headers_agree_with_dicom():
    assert decode_object("ok.dcm", fx.dicom_codestream_claiming("jpeg", 64, 64)).frames[0][1].shape == (64, 64)
    assert decode_object("ok.dcm", fx.dicom_codestream_claiming("j2k", 64, 64)).frames[0][1].shape == (64, 64)


def test_uid_columns_hold_uids_only():
    out = decode_object("x.dcm", fx.dicom_uid_holding(GRAY, "StudyInstanceUID", "Doe^Jane"))
    assert out.uids["study_uid"] is None  # never str() of the value: it quoted the patient's name
    assert valid_uid(out.uids["series_uid"]) and valid_uid(out.uids["sop_uid"])
    for junk in ["1.2.03", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65, "", b"1.2.3", ["1.2"], None, 1.2]:
        assert valid_uid(junk) is None, junk
    assert valid_uid("1.2.840.10008.1.2.1") == "1.2.840.10008.1.2.1" and valid_uid("0.0") == "0.0"


def test_pseudonymised_uids_are_stable_keyed_valid_uids():
    data = fx.dicom_mono(GRAY)
    plain = decode_object("x.dcm", data).uids
    a1 = decode_object("x.dcm", data, uid_key="site-key-1").uids
    a2 = decode_object("x.dcm", data, uid_key="site-key-1").uids
    b = decode_object("x.dcm", data, uid_key="site-key-2").uids
    assert a1 == a2 and all(a1[k] != b[k] for k in a1)
    for k, uid in a1.items():
        assert valid_uid(uid) == uid and uid.startswith("2.25.")
        assert plain[k] not in uid  # the original is gone, not embedded
    assert len(set(a1.values())) == 3
    assert pseudonymize_uid("1.2.3", "k") == pseudonymize_uid("1.2.3", "k") != pseudonymize_uid("1.2.4", "k")


def test_codestream_sizes():
    assert jpeg_size(fx.jpeg(GRAY)) == (64, 48)
    assert jpeg_size(fx.jpeg_claiming(65000, 1)) == (65000, 1)
    for junk in [b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xe0\x00\x00", fx.png(GRAY)]:
        assert jpeg_size(junk) is None
    raw = next(fx.iter_frames(pydicom.dcmread(io.BytesIO(fx.dicom_j2k(GRAY)))))
    assert j2k_size(raw) == (64, 48)
    jp2 = fx.JP2_SIGNATURE + struct.pack(">I4s", 8 + len(raw), b"jp2c") + raw
    assert j2k_size(jp2) == (64, 48)
    for junk in [b"", raw[:20], fx.JP2_SIGNATURE + b"\x00\x00\x00\x00jp2h", fx.jpeg(GRAY)]:
        assert j2k_size(junk) is None


def test_error_text_is_one_short_line_of_a_declared_kind():
    text = error_text("malformed", "first line\nsecond line " + "x" * 1000)
    assert text.startswith("malformed: first line second line") and "\n" not in text and len(text) < 250
    with pytest.raises(ValueError):
        error_text("read_failed", "a kind nothing declares")


def test_deflated_dicom_decodes_and_its_inflated_size_is_counted():
    data = fx.dicom_deflated(GRAY)
    _close(decode_object("d.dcm", data).frames[0][1], GRAY, 0)
    assert GRAY.size < deflated_dataset_size(data, 10**6) < GRAY.size + 4096
    assert deflated_dataset_size(data, 100) > 100  # stops counting once over the limit
    assert deflated_dataset_size(fx.dicom_mono(GRAY), 10**6) is None


def test_a_cine_of_more_frames_than_the_limit_is_too_large_unless_strided():
    from fpc_ray.label.decode import MAX_FRAMES

    # A million 8x8 frames would pass the pixel limit; each kept frame costs a whole model input.
    frames = [np.full((8, 8), k % 256, np.uint8) for k in range(MAX_FRAMES + 1)]
    data = fx.dicom_rgb_multiframe(frames)
    with pytest.raises(DecodeError) as err:
        decode_object("cine.dcm", data)
    assert err.value.kind == "too_large" and "--frame-stride" in str(err.value)
    assert len(decode_object("cine.dcm", data, frame_stride=2).frames) == MAX_FRAMES // 2 + 1


# 12-bit values 0..4080 in steps of 16 along each row.
RAMP12 = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))


def _gray(data: bytes) -> np.ndarray:
    (_, gray), = decode_object("w.dcm", data).frames
    return gray


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (the LINEAR VOI function) into 0..255, written out independently."""
    scaled = ((values.astype(float) - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def test_dicom_without_a_window_is_scaled_by_its_stored_bits():
    _close(_gray(fx.dicom_windowed(RAMP12)), np.rint(RAMP12 * (255 / 4095)).astype(np.uint8), 1)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_center_and_width_are_applied(photometric):
    gray = _gray(fx.dicom_windowed(RAMP12, center=1000, width=500, photometric=photometric))
    want = _linear_window(RAMP12, 1000, 500)
    _close(gray, want if photometric == "MONOCHROME2" else 255 - want, 1)
    assert gray.min() == 0 and gray.max() == 255  # the window is narrower than the data


def test_dicom_voi_lut_sequence_is_applied_before_a_window():
    """A VOILUTSequence (16-bit entries) maps each value; where a window is there too, the LUT
    wins (pydicom's and the standard's order of preference)."""
    lut = np.where(np.arange(4096) >= 2048, 65535, 16384).astype(np.uint16)
    want = np.where(RAMP12 >= 2048, 255, 64).astype(np.uint8)
    _close(_gray(fx.dicom_windowed(RAMP12, voi_lut=(0, lut))), want, 0)
    _close(_gray(fx.dicom_windowed(RAMP12, center=1000, width=500, voi_lut=(0, lut))), want, 0)


def test_a_window_pydicom_cannot_apply_leaves_the_stored_bit_scaling():
    plain = _gray(fx.dicom_windowed(RAMP12))
    assert np.array_equal(_gray(fx.dicom_windowed(RAMP12, center=1000, width=0)), plain)  # LINEAR needs >= 1
    unknown = fx._patched(fx.dicom_windowed(RAMP12, center=1000, width=500), VOILUTFunction="CUBIC")
    assert np.array_equal(_gray(unknown), plain)


@pytest.mark.parametrize("width, height", [(11000, 9000), (14000, 14000)])
def test_past_pils_own_limits_is_our_too_large_without_a_warning(width, height, recwarn):
    """PIL warns past 89 MP and refuses past 179 MP on its own: both are ours to report, as one
    too_large row and no DecompressionBombWarning in the actor's log."""
    with pytest.raises(DecodeError) as err:
        decode_object("big.png", fx.png_bomb(width, height))
    assert err.value.kind == "too_large" and "exceeds the limit of 64000000" in str(err.value)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
