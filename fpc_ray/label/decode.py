"""Turn one archive object's bytes into frames: PNG, JPEG and DICOM (single and multi-frame).

Every failure becomes a :class:`DecodeError` with a kind from ``ERROR_KINDS``; nothing raises
past :func:`decode_object`. No DICOM header field is returned except the three UIDs: patient
identifiers never leave this module.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from fpc_ray.data.transforms import decode_image_bytes, to_gray_u8

MAX_PIXELS = 64_000_000  # all frames of one object together; ultrasound cines are far below
DICM_OFFSET = 128


class DecodeError(Exception):
    """A per-object failure: ``kind`` is one of schema.ERROR_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Decoded:
    """The frames of one object (grayscale uint8) and, for DICOM, its UIDs."""

    frames: list[tuple[int, np.ndarray]]  # (frame index, HxW uint8)
    uids: dict[str, str | None] = field(default_factory=lambda: {"study_uid": None, "series_uid": None,
                                                                  "sop_uid": None})


def is_dicom(uri: str, data: bytes) -> bool:
    """A ``.dcm`` name or the ``DICM`` magic at byte 128 (PACS exports often have no extension)."""
    return uri.lower().endswith((".dcm", ".dicom")) or data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def _decode_raster(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DecodeError("too_large", f"{w}x{h} pixels exceeds the limit of {MAX_PIXELS}")
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except Exception:
        raise DecodeError("not_an_image", "not a PNG, JPEG or DICOM file") from None
    try:
        return decode_image_bytes(data)
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError("truncated", f"image data is incomplete or corrupt ({e})") from None


def _dicom_frames(data: bytes, frame_stride: int) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
        raise DecodeError("truncated", f"unreadable DICOM ({type(e).__name__})") from None
    uids = {"study_uid": _uid(ds, "StudyInstanceUID"), "series_uid": _uid(ds, "SeriesInstanceUID"),
            "sop_uid": _uid(ds, "SOPInstanceUID")}
    if "PixelData" not in ds:
        raise DecodeError("no_pixels", "DICOM object without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError("no_pixels", "DICOM image attributes are missing") from None
    if rows * cols * n_frames > MAX_PIXELS:
        raise DecodeError("too_large", f"{n_frames} x {cols}x{rows} pixels exceeds the limit")
    try:
        arr = ds.pixel_array
    except NotImplementedError as e:
        raise DecodeError("unsupported", f"transfer syntax {ds.file_meta.TransferSyntaxUID.name}: {e}") from None
    except Exception as e:  # pydicom raises many types for truncated or corrupt pixel data
        raise DecodeError("truncated", f"pixel data cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if n_frames == 1:
        arr = arr[None]
    elif samples == 1 and arr.ndim == 2:  # a one-frame "multi-frame" object
        arr = arr[None]
    frames = []
    for index in range(0, arr.shape[0], frame_stride):
        gray = to_gray_u8(_window(arr[index], ds))
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        frames.append((index, gray))
    return Decoded(frames, uids)


def _window(frame: np.ndarray, ds) -> np.ndarray:
    """Scale deep monochrome frames to their stored bit depth, not the container type's."""
    if frame.ndim == 2 and frame.dtype != np.uint8:
        bits = int(getattr(ds, "BitsStored", 16) or 16)
        frame = frame.astype(np.float32)
        if frame.min() < 0:
            frame -= frame.min()
        return np.clip(frame * (255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)
    return frame


def _uid(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def decode_object(uri: str, data: bytes, frame_stride: int = 1) -> Decoded:
    """Decode an archive object into grayscale frames.

    Raises:
        DecodeError: always with a kind, for anything that is not a decodable image.
    """
    if not data:
        raise DecodeError("empty", "zero-byte object")
    if is_dicom(uri, data):
        return _dicom_frames(data, frame_stride)
    return Decoded([(0, _decode_raster(data))])
