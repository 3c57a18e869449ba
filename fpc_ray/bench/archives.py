"""Phantom archives for `fpc-ray bench gpu`: PNG files, JPEG files, DICOM JPEG Baseline cine loops.

A 20,000-frame archive is built from a pool of a few hundred distinct phantom frames: each file
gets its own name (so every one is new to the labeller), and PNG/JPEG copies are hard links where
the filesystem allows, so building the archive costs seconds and no disk beyond the pool. Reading
and decoding cost the same for a copy as for a distinct image.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np

from fpc_ray.data.fetal_planes import CLASS_NAMES, CSV_NAME, IMAGE_EXT, IMAGES_DIR, Record, read_fetal_planes, write_csv
from fpc_ray.data.synth import render_phantom

# Scanner-export sizes the ceilings were measured on.
FRAME_WIDTH, FRAME_HEIGHT = 800, 600
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Frame:
    plane: str
    gray: np.ndarray  # H x W uint8


def phantom_pool(n: int, seed: int = 0, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT) -> list[Frame]:
    """``n`` distinct phantom frames, the six planes in turn."""
    frames = []
    for i in range(n):
        plane = CLASS_NAMES[i % len(CLASS_NAMES)]
        frames.append(Frame(plane, render_phantom(plane, np.random.default_rng([seed, i]), width, height,
                                                  banner=f"PHANTOM {i:05d}")))
    return frames


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dest)


def _replicated(encoded: list[bytes], n: int, folder: str, ext: str) -> str:
    """``n`` files under ``folder``: the encoded pool written once, then linked under new names."""
    os.makedirs(folder, exist_ok=True)
    pool = []
    for i, data in enumerate(encoded[:n]):
        path = os.path.join(folder, f"frame{i:06d}{ext}")
        with open(path, "wb") as f:
            f.write(data)
        pool.append(path)
    for i in range(len(pool), n):
        _link_or_copy(pool[i % len(pool)], os.path.join(folder, f"frame{i:06d}{ext}"))
    return folder


def encode_png(gray: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", gray)
    assert ok
    return png.tobytes()


def encode_jpeg(gray: np.ndarray) -> bytes:
    """RGB JPEG (4:2:0, quality 90), as scanners export stills."""
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return jpg.tobytes()


def png_archive(pool: list[Frame], n: int, folder: str) -> str:
    return _replicated([encode_png(f.gray) for f in pool], n, folder, ".png")


def jpeg_archive(pool: list[Frame], n: int, folder: str) -> str:
    return _replicated([encode_jpeg(f.gray) for f in pool], n, folder, ".jpg")


def _cine_dataset(rows: int, cols: int, frames: int):
    """A de-identified DICOM Ultrasound Multi-frame header for a JPEG Baseline YBR_FULL_422 loop."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEGBaseline8Bit, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _ybr422_jpeg(gray: np.ndarray) -> bytes:
    """A frame as the cine exports hold it: JPEG Baseline, 3 components, 4:2:2 subsampling."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=1)
    return buf.getvalue()


def dicom_cine_archive(pool: list[Frame], n_frames: int, per_cine: int, folder: str) -> str:
    """``n_frames`` frames as DICOM JPEG Baseline cine loops of ``per_cine`` frames each (the last
    one shorter), frames drawn from the pool in turn."""
    from pydicom.encaps import encapsulate

    os.makedirs(folder, exist_ok=True)
    encoded = [_ybr422_jpeg(f.gray) for f in pool]
    rows, cols = pool[0].gray.shape
    done, k = 0, 0
    while done < n_frames:
        count = min(per_cine, n_frames - done)
        ds = _cine_dataset(rows, cols, count)
        ds.PixelData = encapsulate([encoded[(done + j) % len(encoded)] for j in range(count)])
        ds["PixelData"].VR = "OB"
        ds.save_as(os.path.join(folder, f"cine{k:05d}.dcm"), enforce_file_format=True)
        done, k = done + count, k + 1
    return folder


def expand_dataset(src: str, dest: str, images: int) -> str:
    """A FETAL_PLANES_DB of ``images`` rows built from ``src`` (local) by repeating its images
    under new names, each copy kept with its patient, so patient splits stay patient splits."""
    records = read_fetal_planes(src).records
    os.makedirs(os.path.join(dest, IMAGES_DIR), exist_ok=True)
    out = []
    for i in range(images):
        r = records[i % len(records)]
        name = f"{r.image_name}_copy{i // len(records)}"
        _link_or_copy(os.path.join(src, IMAGES_DIR, r.image_name + IMAGE_EXT),
                      os.path.join(dest, IMAGES_DIR, name + IMAGE_EXT))
        out.append(Record(name, r.patient, r.plane, r.brain_plane, r.operator, r.machine, r.official_train))
    with open(os.path.join(dest, CSV_NAME), "w") as f:
        f.write(write_csv(out))
    return dest
