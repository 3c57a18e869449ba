"""Build an archive with every kind of input `fpc-ray label` must handle (DICOM via pydicom)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-8675309", "PatientBirthDate": "19850412",
           "AccessionNumber": "ACC-445566", "InstitutionName": "St Example Maternity"}


def _base(sop_class, rows, cols, frames=1, samples=1, bits=8, identifiers=True) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    if identifiers:
        for k, v in PATIENT.items():
            setattr(ds, k, v)
        ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_mono(gray: np.ndarray, identifiers=True) -> bytes:
    ds = _base(UltrasoundImageStorage, *gray.shape, identifiers=identifiers)
    ds.PixelData = gray.astype(np.uint8).tobytes()
    return _bytes(ds)


def dicom_big_endian_16bit(gray: np.ndarray) -> bytes:
    ds = _base(UltrasoundImageStorage, *gray.shape, bits=16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = (gray.astype(">u2") * 257).tobytes()
    return _bytes(ds)


def dicom_windowed(values: np.ndarray, center: float | None = None, width: float | None = None,
                   voi_lut: tuple[int, np.ndarray] | None = None, photometric: str = "MONOCHROME2") -> bytes:
    """12-bit values in 16-bit MONOCHROME carrying a window (WindowCenter / WindowWidth), a VOI LUT
    (``(first value mapped, 16-bit entries)``, a VOILUTSequence), both, or neither."""
    ds = _base(UltrasoundImageStorage, *values.shape, bits=16)
    ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 12, 11, photometric
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_lut is not None:
        first, entries = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(entries), first, 16]
        item.LUTData = np.asarray(entries, "<u2").tobytes()
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = [item]
    ds.PixelData = values.astype("<u2").tobytes()
    return _bytes(ds)


def dicom_rgb_multiframe(frames: list[np.ndarray]) -> bytes:
    rgb = np.stack([np.stack([f] * 3, axis=-1) for f in frames])
    ds = _base(UltrasoundMultiFrameImageStorage, *frames[0].shape, frames=len(frames), samples=3)
    ds.PixelData = rgb.astype(np.uint8).tobytes()
    return _bytes(ds)


def dicom_rle(gray: np.ndarray) -> bytes:
    ds = _base(UltrasoundImageStorage, *gray.shape)
    ds.PixelData = gray.astype(np.uint8).tobytes()
    ds.compress(RLELossless)
    return _bytes(ds)


def dicom_j2k(gray: np.ndarray) -> bytes:
    ds = _base(UltrasoundImageStorage, *gray.shape)
    ds.PixelData = gray.astype(np.uint8).tobytes()
    ds.compress(JPEG2000Lossless)
    return _bytes(ds)


def dicom_jpeg_ybr_cine(frames: list[np.ndarray]) -> bytes:
    """JPEG Baseline, YBR_FULL_422, multi-frame: the usual cine loop export."""
    ds = _base(UltrasoundMultiFrameImageStorage, *frames[0].shape, frames=len(frames), samples=3)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    encoded = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(np.stack([f] * 3, axis=-1).astype(np.uint8)).save(buf, format="JPEG", quality=95,
                                                                           subsampling=1)
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


def dicom_palette(gray: np.ndarray) -> bytes:
    ds = _base(UltrasoundImageStorage, *gray.shape)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = np.arange(256, dtype=np.uint16) * 257
    for color in ("Red", "Green", "Blue"):
        setattr(ds, f"{color}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{color}PaletteColorLookupTableData", lut.tobytes())
    ds.PixelData = gray.astype(np.uint8).tobytes()
    return _bytes(ds)


def dicom_without_pixels() -> bytes:
    ds = _base(UltrasoundImageStorage, 64, 64)
    return _bytes(ds)


def dicom_mpeg2_video() -> bytes:
    """An MPEG-2 ultrasound clip: a transfer syntax no pixel decoder here handles."""
    ds = _base(UltrasoundImageStorage, 48, 64)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])  # an MPEG sequence header
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


def png_bomb(width: int = 100000, height: int = 100000) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, with a tiny body."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# Hostile objects: each once stopped a labelling run or blew up an actor's memory.

def _patched(data: bytes, **changes) -> bytes:
    """``data`` (a DICOM file) with header values changed, pixel data untouched."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _bytes(ds)


def dicom_nested_sequences(depth: int = 2000) -> bytes:
    """A DICOM whose sequence items nest ``depth`` deep (undefined lengths): pydicom recurses."""
    tag = struct.pack("<HH", 0x0040, 0x0275) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return dicom_without_pixels() + (tag + item) * depth + end * depth


def dicom_odd_length_rows(gray: np.ndarray) -> bytes:
    """Rows (US) stored with an odd length of 3 bytes."""
    data = dicom_mono(gray)
    rows = struct.pack("<HH", 0x28, 0x10) + b"US" + struct.pack("<H", 2)
    i = data.index(rows)
    return data[:i] + rows[:6] + struct.pack("<H", 3) + data[i + 8:i + 10] + b"\0" + data[i + 10:]


def dicom_unknown_vr(gray: np.ndarray, group: int = 0x28, element: int = 0x10) -> bytes:
    """The VR of one element (Rows by default) replaced by the undefined ``QQ``."""
    data = dicom_mono(gray)
    i = data.index(struct.pack("<HH", group, element))
    return data[:i + 4] + b"QQ" + data[i + 6:]


def dicom_palette_without_lut(gray: np.ndarray) -> bytes:
    changes = {f"{color}PaletteColorLookupTable{part}": None
               for color in ("Red", "Green", "Blue") for part in ("Descriptor", "Data")}
    return _patched(dicom_palette(gray), **changes)


def dicom_excess_frames(frames: list[np.ndarray], declared: int, jpeg: bool = False) -> bytes:
    """A cine whose pixel data holds ``len(frames)`` frames but whose header says ``declared``."""
    data = dicom_jpeg_ybr_cine(frames) if jpeg else dicom_rgb_multiframe(frames)
    return _patched(data, NumberOfFrames=declared)


def dicom_uid_holding(gray: np.ndarray, keyword: str, value: str) -> bytes:
    """A UID element holding free text (bad exporters put names there), written as is."""
    data = dicom_mono(gray)
    ds_uid = {"StudyInstanceUID": (0x20, 0x0D), "SeriesInstanceUID": (0x20, 0x0E)}[keyword]
    i = data.index(struct.pack("<HH", *ds_uid) + b"UI")
    old_len = struct.unpack("<H", data[i + 6:i + 8])[0]
    raw = value.encode() + (b"\0" if len(value) % 2 else b"")
    return data[:i + 6] + struct.pack("<H", len(raw)) + raw + data[i + 8 + old_len:]


def _patch_jpeg_sof(codestream: bytes, width: int, height: int) -> bytes:
    data = bytearray(codestream)
    for sof in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(sof)
        if i > 0:
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF claims ``width x height`` (a decompression bomb)."""
    return _patch_jpeg_sof(jpeg(np.zeros((16, 16), np.uint8)), width, height)


def dicom_codestream_claiming(codec: str, width: int, height: int, rows: int = 64, cols: int = 64) -> bytes:
    """A ``rows x cols`` DICOM whose one JPEG / JPEG 2000 frame claims ``width x height``."""
    gray = np.zeros((rows, cols), np.uint8)
    if codec == "j2k":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(dicom_j2k(gray)))
        frame = bytearray(next(iter_frames(ds)))
        frame[8:16] = struct.pack(">II", width, height)  # Xsiz, Ysiz of SIZ, offsets 0
        ds.PixelData = encapsulate([bytes(frame)])
        return _bytes(ds)
    ds = _base(UltrasoundImageStorage, rows, cols)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([_patch_jpeg_sof(jpeg(gray), width, height)])
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def iter_frames(ds):
    from pydicom.encaps import generate_frames

    return generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))


def dicom_huge_dimensions() -> bytes:
    """Rows x Columns x NumberOfFrames that multiply to ~4 * 10^12 pixels, with a tiny body."""
    ds = _base(UltrasoundMultiFrameImageStorage, 65535, 65535, frames=1000)
    ds.PixelData = b"\0" * 64
    return _bytes(ds)


def raster(gray: np.ndarray, fmt: str) -> bytes:
    """``gray`` in a format Pillow reads but the labeller must refuse (TIFF, GIF, BMP...)."""
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format=fmt)
    return buf.getvalue()


def dicom_deflated(gray: np.ndarray, extra_zeros: int = 0) -> bytes:
    """Deflated Explicit VR Little Endian; ``extra_zeros`` appends a private OB element of zeros
    after the pixel data (inside the deflate stream: ~1 KB per MB, a zip bomb)."""
    ds = _base(UltrasoundImageStorage, *gray.shape)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = gray.astype(np.uint8).tobytes()
    data = _bytes(ds)
    if not extra_zeros:
        return data
    start = 144 + struct.unpack("<I", data[140:144])[0]  # after (0002,0000) and its group
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [packer.compress(zlib.decompress(data[start:], -zlib.MAX_WBITS)),
            packer.compress(struct.pack("<HH", 0x7FE1, 0x1010) + b"OB\0\0" + struct.pack("<I", extra_zeros))]
    chunk = bytes(16 * 1024**2)
    for offset in range(0, extra_zeros, len(chunk)):
        body.append(packer.compress(chunk[:extra_zeros - offset]))
    return data[:start] + b"".join(body) + packer.flush()
