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


def png_bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels, with a tiny body."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", 100000, 100000)
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
