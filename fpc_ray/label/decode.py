"""Turn one archive object's bytes into frames: PNG, JPEG and DICOM (single and multi-frame).

Every failure becomes a :class:`DecodeError` with a kind from ``ERROR_KINDS``; nothing raises
past :func:`decode_object` except BaseExceptions (KeyboardInterrupt, SystemExit). No DICOM
header field is returned except the three UIDs: patient identifiers never leave this module.

Memory stays bounded by what an object may legitimately decode to: sizes are checked against
``MAX_PIXELS`` from the headers (PNG / JPEG header, DICOM Rows x Columns x frames, and the JPEG
or JPEG 2000 codestream of every frame to be decoded) before any decoder allocates, and DICOM
frames are decoded one at a time, keeping only those the frame stride selects.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from fpc_ray.data.transforms import (
    MAX_PIXELS,
    PNG_SIGNATURE,
    TooManyPixels,
    decode_image_bytes,
    open_image,
    to_gray_u8,
)
from fpc_ray.errors import private_reason
from fpc_ray.label.codestream import deflated_dataset_size, j2k_size, jpeg_ends, jpeg_header, jpeg_size
from fpc_ray.label.schema import error_text
from fpc_ray.label.uids import output_uid

# MAX_PIXELS (transforms.py, shared with training): all frames of one object together.
# Frames kept from one object (after --frame-stride): each becomes a letterboxed model input and
# a thumbnail, whatever its source size, so a cine of a million 8x8 frames passes MAX_PIXELS and
# would still fill the actor's memory. A minute at 30 frames/s is 1,800.
MAX_FRAMES = 2_000
# The decoded values of all frames: room for RGB 8-bit or 16-bit gray at MAX_PIXELS; it refuses
# what the pixel count alone lets through (64-bit float samples, say).
MAX_DECODED_BYTES = 4 * MAX_PIXELS
DICM_OFFSET = 128
JPEG_SOI = b"\xff\xd8\xff"  # start of image, then the first segment's marker
# A deflated DICOM dataset may inflate to its pixel data plus headers, no more: past this, pydicom's
# own whole-file zlib.decompress would be the bomb.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 64 * 1024**2
_VOI_BAND_PIXELS = 1 << 20  # pixels windowed at once (see _apply_voi)
_UID_KEYWORDS = {"study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID",
                 "sop_uid": "SOPInstanceUID"}


def quiet_pydicom() -> None:
    """Keep pydicom from quoting header values (a UID element holding a patient's name, an odd
    Number of Frames) in a warning or a log record, for the rest of this process: its value
    validation off, its warnings ignored, its loggers (children included) silent.

    Called before each DICOM decode, never at import. Set for good, not saved and restored around
    each decode: ``warnings.catch_warnings`` swaps one process-wide list, which decode threads
    interleaving with other users of it would leave changed or drop early. Called each time
    because such a user elsewhere may have restored a list without the filter."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")  # no duplicate: it replaces its equal
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


class DecodeError(Exception):
    """A per-object failure: ``kind`` is one of schema.ERROR_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(error_text(kind, detail))
        self.kind = kind


@dataclass(frozen=True)
class Codestream:
    """A frame left encoded for a batched JPEG decoder (see ``decode_object(keep_jpeg=True)``):
    8-bit baseline, one or three components, complete, its size checked against the limits."""

    data: bytes
    height: int
    width: int


@dataclass
class Decoded:
    """The frames of one object (grayscale uint8, or JPEG codestreams left to decode), what kind
    of input it was and, for DICOM, its UIDs."""

    frames: list[tuple[int, np.ndarray | Codestream]]  # (frame index, HxW uint8 or its codestream)
    uids: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(_UID_KEYWORDS))
    kind: str | None = None  # "png", "jpeg", "dicom" (one frame) or "dicom_cine" (several)


def sniff(uri: str, data: bytes) -> str | None:
    """What the content says it is: ``"png"``, ``"jpeg"`` or ``"dicom"`` by its magic bytes (PNG
    signature, JPEG start of image, ``DICM`` at byte 128), else ``"dicom"`` for a ``.dcm`` name (a
    dataset written without its preamble), else None. The content wins over the name: a PNG named
    ``x.dcm`` is a PNG, a DICOM without an extension is a DICOM (PACS exports often have none)."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SOI):
        return "jpeg"
    if data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM" or uri.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return None


def _raster(data: bytes, keep_jpeg: bool, magic: str | None = None) -> Decoded:
    """A PNG or JPEG file's one frame; with ``keep_jpeg``, a JPEG a batched decoder takes stays
    encoded (its size is checked here, as the decoder would allocate it). ``magic``: what
    :func:`sniff` said; a PNG or JPEG by its magic whose header cannot be read is cut short."""
    try:
        with open_image(data) as im:  # the format, from the header alone
            fmt, mode, (width, height) = im.format, im.mode, im.size
    except TooManyPixels as e:
        raise DecodeError("too_large", str(e)) from None
    except Exception:
        if magic in ("png", "jpeg"):
            raise DecodeError("truncated", f"{magic.upper()} data stops or breaks inside its header") from None
        raise DecodeError("not_an_image", "not a PNG, JPEG or DICOM file") from None
    kind = fmt.lower()
    if (keep_jpeg and fmt == "JPEG" and mode in ("L", "RGB") and width * height <= MAX_PIXELS
            and batch_decodable(data, 1 if mode == "L" else 3)):
        return Decoded([(0, Codestream(data, height, width))], kind=kind)
    return Decoded([(0, decode_raster(data))], kind=kind)


def batch_decodable(codestream: bytes, components: int) -> bool:
    """Whether a batched JPEG decoder (nvJPEG) gives this codestream the CPU decoder's pixels:
    sequential 8-bit, ``components`` of them (one or three), and complete. Progressive, 12-bit,
    lossless, CMYK and cut-off codestreams stay with the CPU decoder."""
    header = jpeg_header(codestream[:65536])  # the header segments lie within the first bytes
    return (header is not None and header.marker in (0xC0, 0xC1) and header.precision == 8
            and header.components == components and components in (1, 3) and jpeg_ends(codestream))


def decode_raster(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes (a file, or one DICOM frame's codestream) -> HxW uint8.

    Raises:
        DecodeError: too_large or truncated, as for a file of the archive.
    """
    try:
        return decode_image_bytes(data)
    except TooManyPixels as e:
        raise DecodeError("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        # Decoders quote header values in their messages: the reason only (see private_reason).
        raise DecodeError("truncated", f"image data is incomplete or corrupt ({private_reason(e)})") from None


@dataclass
class _Geometry:
    """What the DICOM header says the pixel data holds."""

    rows: int
    cols: int
    n_frames: int
    samples: int
    bytes_per_sample: int


def _geometry(ds) -> _Geometry:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError("no_pixels", "DICOM image attributes are missing") from None
    if min(rows, cols, n_frames, samples, bits) < 1:
        raise DecodeError("malformed", f"image attributes {n_frames} x {cols}x{rows}x{samples}, {bits} bits")
    geo = _Geometry(rows, cols, n_frames, samples, -(-bits // 8))
    pixels = rows * cols * n_frames
    if pixels > MAX_PIXELS or pixels * samples * geo.bytes_per_sample > MAX_DECODED_BYTES:
        raise DecodeError("too_large", f"{n_frames} x {cols}x{rows}x{samples} samples of {bits} bits "
                                       f"exceeds the limit of {MAX_PIXELS} pixels")
    return geo


def _check_codestreams(ds, geo: _Geometry, indices: list[int]) -> None:
    """Refuse encapsulated frames whose codestream claims more than the header, before decoding.

    Frames are split the way the decoder splits them (pydicom's ``generate_frames``), so the
    codestream checked is the one that will be decoded.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
        read_size, name = jpeg_size, "JPEG"
    elif tsyntax in JPEG2000TransferSyntaxes:
        read_size, name = j2k_size, "JPEG 2000"
    else:
        return  # RLE and native data decode to the header's size, checked by _geometry
    wanted = set(indices)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=geo.n_frames)):
        if index > max(wanted):
            break
        if index not in wanted:
            continue
        size = read_size(frame[:65536])  # the header segments lie within the first bytes
        if size is None:
            raise DecodeError("malformed", f"frame {index}: no {name} frame header")
        w, h = size
        if w * h * geo.n_frames > MAX_PIXELS:
            raise DecodeError("too_large", f"frame {index}: the {name} codestream claims {w}x{h} pixels "
                                           f"({geo.n_frames} frames), over the limit of {MAX_PIXELS}")
        if (w, h) != (geo.cols, geo.rows):
            raise DecodeError("malformed", f"frame {index}: the {name} codestream is {w}x{h}, "
                                           f"the header says {geo.cols}x{geo.rows}")


def _check_inflated_size(data: bytes) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose dataset inflates past the limit,
    before pydicom inflates it whole."""
    inflated = deflated_dataset_size(data, MAX_INFLATED_BYTES)
    if inflated is not None and inflated > MAX_INFLATED_BYTES:
        raise DecodeError("too_large", f"the deflated dataset inflates past {MAX_INFLATED_BYTES} bytes")


def _read_dicom(data: bytes, uid_key: str | None):
    """The dataset and its three UIDs (pseudonymized with ``uid_key``), refused early where its
    pixels cannot be decoded at all."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_inflated_size(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
        raise DecodeError("truncated", f"unreadable DICOM ({type(e).__name__})") from None
    uids = {column: output_uid(_value(ds, keyword), uid_key) for column, keyword in _UID_KEYWORDS.items()}
    if "PixelData" not in ds:
        raise DecodeError("no_pixels", "DICOM object without pixel data")
    return ds, uids


def _pixel_decoder(ds):
    """The dataset's transfer syntax and pydicom's decoder for it."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise DecodeError("malformed", "DICOM object without a transfer syntax")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DecodeError("unsupported", f"transfer syntax {_syntax_name(tsyntax)}: no pixel decoder") from None
    if not decoder.is_available:
        raise DecodeError("unsupported", f"transfer syntax {_syntax_name(tsyntax)}: no decoding plugin installed")
    return tsyntax, decoder


def _dicom_frames(data: bytes, frame_stride: int, uid_key: str | None, keep_jpeg: bool = False) -> Decoded:
    ds, uids = _read_dicom(data, uid_key)
    geo = _geometry(ds)
    tsyntax, decoder = _pixel_decoder(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" not in ds:
        raise DecodeError("malformed", "PALETTE COLOR without its lookup tables")

    indices = list(range(0, geo.n_frames, frame_stride))
    if len(indices) > MAX_FRAMES:
        raise DecodeError("too_large", f"{len(indices)} frames to label, over the limit of {MAX_FRAMES} per "
                                       f"object; label it with a larger --frame-stride")
    if tsyntax.is_encapsulated:
        _check_codestreams(ds, geo, indices)
    kind = "dicom_cine" if geo.n_frames > 1 else "dicom"
    if keep_jpeg and _jpeg_as_is(ds, tsyntax, photometric, geo):
        kept = _codestreams(ds, geo, indices)
        if kept is not None:
            return Decoded(kept, uids, kind)
    frames = []
    # One frame at a time: only the frames kept are decoded, and extra frames past
    # NumberOfFrames (a cine that holds more than its header says) are ignored, not returned.
    pixels = decoder.iter_array(ds, indices=indices, allow_excess_frames=False)
    for index in indices:
        try:
            arr, _ = next(pixels)
        except MemoryError:
            raise DecodeError("too_large", "pixel data does not fit in memory") from None
        except Exception as e:  # pydicom and its plugins raise many types for corrupt pixel data
            raise DecodeError("truncated", f"pixel data cannot be decoded ({private_reason(e)})") from None
        frames.append((index, _to_gray(arr, ds, photometric)))
    return Decoded(frames, uids, kind)


def _jpeg_as_is(ds, tsyntax, photometric: str, geo: _Geometry) -> bool:
    """Whether this DICOM's frames, decoded by a JPEG decoder alone and turned gray, are its
    CPU-decoded gray frames: JPEG Baseline 8-bit, no palette, no inversion, no window or VOI LUT."""
    from pydicom.uid import JPEGBaseline8Bit

    if tsyntax != JPEGBaseline8Bit or int(ds.get("BitsStored", 8) or 8) != 8:
        return False
    if geo.samples == 3:
        return photometric in ("YBR_FULL_422", "YBR_FULL")
    return geo.samples == 1 and photometric == "MONOCHROME2" and _voi_kind(ds) is None


def _codestreams(ds, geo: _Geometry, indices: list[int]) -> list[tuple[int, Codestream]] | None:
    """The encapsulated frames kept, as codestreams; None where one of them is not
    :func:`batch_decodable` or missing (the CPU decoder then decodes the object, and reports it)."""
    from pydicom.encaps import generate_frames

    wanted, kept = set(indices), []
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=geo.n_frames)):
        if index > indices[-1]:
            break
        if index in wanted:
            if not batch_decodable(frame, geo.samples):
                return None
            kept.append((index, Codestream(bytes(frame), geo.rows, geo.cols)))
    return kept if len(kept) == len(indices) else None


def _syntax_name(tsyntax) -> str:
    """A transfer syntax's name, or its UID: pydicom names an unknown UID by the header's raw text."""
    return tsyntax.name if tsyntax.is_transfer_syntax else (output_uid(str(tsyntax), None) or "(not a UID)")


def _to_gray(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        frame = apply_color_lut(frame, ds)
    gray = to_gray_u8(_window(frame, ds, photometric))
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _window(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    """A monochrome frame through the file's VOI LUT or window (what a viewer shows) where it
    carries one; otherwise, and where pydicom cannot apply it (a width below 1, an unknown VOI
    function, a LUT of the wrong length), scaled by its stored bit depth: the pixels themselves
    are sound, so a broken presentation setting costs the window, not the object."""
    if frame.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2") and _voi_kind(ds):
        try:
            return _apply_voi(frame, ds)
        except MemoryError:
            raise
        except Exception:
            pass
    return _scale_to_stored_bits(frame, ds)


def _voi_kind(ds) -> str | None:
    """``"lut"`` or ``"window"``: what pydicom's ``apply_voi_lut`` applies (a VOI LUT before a
    window), or None where the file carries neither."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _apply_voi(frame: np.ndarray, ds) -> np.ndarray:
    """The modality LUT (rescale) and then the VOI LUT or window, as 8 bits, a band of rows at a
    time: pydicom computes in float64, and a whole frame of it would be 8 bytes a pixel."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    if _voi_kind(ds) == "lut":  # PS3.3 C.11.2.1.1: n-bit entries map into 0 .. 2^n - 1
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:  # the window maps everything below it to the bottom of its output range, above to the top
        lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
    if not hi > lo:
        raise ValueError("empty VOI output range")
    out = np.empty(frame.shape, np.uint8)
    step = max(1, _VOI_BAND_PIXELS // max(1, frame.shape[1]))
    for top in range(0, frame.shape[0], step):
        values = apply_voi_lut(apply_modality_lut(frame[top:top + step], ds), ds)
        out[top:top + step] = np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255)
    return out


def _scale_to_stored_bits(frame: np.ndarray, ds) -> np.ndarray:
    """Scale deep monochrome frames to their stored bit depth, not the container type's."""
    if frame.ndim == 2 and frame.dtype != np.uint8:
        bits = min(max(int(ds.get("BitsStored", 16) or 16), 1), 32)
        frame = frame.astype(np.float32)
        if frame.min() < 0:
            frame -= frame.min()
        return np.clip(frame * (255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)
    return frame


def _value(ds, keyword: str):
    """A header value, or None where the element cannot even be parsed (odd VR, bad length)."""
    try:
        return ds[keyword].value if keyword in ds else None
    except Exception:
        return None


def decode_object(uri: str, data: bytes, frame_stride: int = 1, uid_key: str | None = None,
                  keep_jpeg: bool = False) -> Decoded:
    """Decode an archive object into grayscale frames.

    Args:
        uri: the object's name; a ``.dcm`` / ``.dicom`` name is read as DICOM unless its bytes
            are a PNG's or a JPEG's (see :func:`sniff`).
        data: the object's bytes.
        frame_stride: keep every n-th frame of a multi-frame DICOM.
        uid_key: when set, DICOM UIDs are replaced by their keyed hash (see ``uids.pseudonymize_uid``).
        keep_jpeg: leave JPEG frames that a batched decoder takes as :class:`Codestream` (JPEG
            files, and JPEG Baseline DICOM whose frames need no other conversion); every check
            before decoding still applies.

    Raises:
        DecodeError: always with a kind, for anything that is not a decodable image; unexpected
            failures of the parsers (RecursionError on nested sequences, odd values) are
            ``malformed``, and running out of memory is ``too_large``.
    """
    if not data:
        raise DecodeError("empty", "zero-byte object")
    magic = sniff(uri, data)
    try:
        if magic == "dicom":
            quiet_pydicom()
            decoded = _dicom_frames(data, frame_stride, uid_key, keep_jpeg)
        else:
            decoded = _raster(data, keep_jpeg, magic)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("too_large", "decoding ran out of memory") from None
    except Exception as e:  # a parser bug or a case nobody anticipated: this object's failure only
        raise DecodeError("malformed", private_reason(e)) from None
    if not decoded.frames:
        raise DecodeError("no_pixels", "no frames")
    for index, gray in decoded.frames:
        if isinstance(gray, Codestream):
            continue
        if gray.ndim != 2 or gray.dtype != np.uint8 or 0 in gray.shape:
            raise DecodeError("malformed", f"frame {index} decoded to {gray.dtype} {gray.shape}")
    return decoded
