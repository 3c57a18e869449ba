"""Phantom ultrasound data in the exact FETAL_PLANES_DB layout.

Each image is a fan-shaped sector of speckled tissue with a burned-in text banner; each of the
six planes has its own anatomy-like structure (skull ring with midline, ribbed thorax with a
four-chamber heart, abdomen with stomach bubble and spine, femur with acoustic shadow, cervical
canal, or unstructured clutter for "Other") at random position, scale and angle, among
distractor blobs. Learnable, but not from a single pixel statistic.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw, ImageFont

from fpc_ray.config import StorageConfig
from fpc_ray.data.fetal_planes import (
    BRAIN_PLANES,
    CLASS_NAMES,
    CSV_NAME,
    IMAGE_EXT,
    IMAGES_DIR,
    Record,
    write_csv,
)
from fpc_ray.errors import UserError
from fpc_ray.storage import resolve

OPERATORS = ("Op. 1", "Op. 2", "Op. 3", "Other")
MACHINES = ("Voluson E6", "Voluson S10", "Aloka", "Other")


class _Canvas:
    """An echogenicity map over the image grid, drawn into in structure-local coordinates."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)
        self.echo = np.zeros((height, width), np.float32)

    def local(self, cx, cy, angle, scale):
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        return (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale

    @staticmethod
    def ring(u, v, a, b, thickness):
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return np.exp(-(((r - 1.0) * min(a, b) / thickness) ** 2))

    @staticmethod
    def disc(u, v, a, b, soft=0.08):
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / soft, -30, 30)))

    @staticmethod
    def segment(u, v, x0, y0, x1, y1, width):
        px, py = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * px + (v - y0) * py) / (px * px + py * py + 1e-6), 0, 1)
        d = np.hypot(u - (x0 + t * px), v - (y0 + t * py))
        return np.exp(-((d / width) ** 2))

    def add(self, pattern, gain):
        self.echo += gain * pattern

    def darken(self, pattern, amount):
        self.echo *= 1.0 - amount * np.clip(pattern, 0, 1)


def _brain(cv, u, v, rng):
    cv.add(cv.ring(u, v, 1.0, 0.78, 0.07), 1.1)
    cv.darken(cv.disc(u, v, 0.93, 0.71), 0.6)
    cv.add(cv.segment(u, v, -0.85, 0, 0.85, 0, 0.025), 0.7)  # midline echo
    off = rng.uniform(0.25, 0.4)
    for side in (-1, 1):
        cv.darken(cv.disc(u - 0.1, v - side * off * 0.6, 0.22, 0.12), 0.8)  # thalami / ventricles


def _thorax(cv, u, v, rng):
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    ribs = (np.cos(theta * rng.integers(9, 13)) > 0.3).astype(np.float32)
    cv.add(np.exp(-(((r - 1.0) / 0.06) ** 2)) * ribs, 1.0)
    hx, hy = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)
    cv.add(cv.disc(u - hx, v - hy, 0.45, 0.4), 0.35)
    for qx, qy in ((-1, -1), (-1, 1), (1, -1), (1, 1)):  # four chambers
        cv.darken(cv.disc(u - hx - qx * 0.17, v - hy - qy * 0.15, 0.14, 0.12), 0.9)


def _abdomen(cv, u, v, rng):
    cv.add(cv.ring(u, v, 1.0, 0.92, 0.04), 0.6)
    cv.add(cv.disc(u, v, 0.97, 0.89), 0.25)
    sx, sy = rng.uniform(-0.4, 0.1), rng.uniform(-0.4, 0.4)
    cv.darken(cv.disc(u - sx, v - sy, 0.3, 0.22), 0.95)  # stomach bubble
    for k in range(3):  # spine: three bright dots near the wall
        cv.add(cv.disc(u - 0.72, v - (k - 1) * 0.13, 0.07, 0.07), 1.0)
    cv.add(cv.segment(u, v, 0.0, 0.2, 0.45, 0.35, 0.04), 0.6)  # umbilical vein


def _femur(cv, u, v, rng):
    length = rng.uniform(0.9, 1.3)
    cv.add(cv.segment(u, v, -length, 0, length, 0, 0.07), 1.4)
    # Bone stops the beam: darken what lies below the bone in the image (deeper tissue).
    shadow = (np.abs(u) < length) & (v > 0.05)
    cv.darken(shadow.astype(np.float32), 0.7)


def _cervix(cv, u, v, rng):
    bend = rng.uniform(-0.25, 0.25)
    vv = v - bend * u**2
    band = np.exp(-((vv / 0.35) ** 2)) * (np.abs(u) < 1.6)
    cv.add(band, 0.55)
    cv.darken(np.exp(-((vv / 0.04) ** 2)) * (np.abs(u) < 1.5), 0.8)  # the canal
    cv.add(np.exp(-(((np.abs(vv) - 0.09) / 0.03) ** 2)) * (np.abs(u) < 1.5), 0.5)  # its mucosa


def _other(cv, u, v, rng):
    for _ in range(rng.integers(2, 5)):
        a, b = rng.uniform(0.15, 0.7), rng.uniform(0.15, 0.7)
        cx, cy = rng.uniform(-1, 1), rng.uniform(-1, 1)
        if rng.random() < 0.5:
            cv.add(cv.disc(u - cx, v - cy, a, b, soft=0.3), rng.uniform(0.2, 0.6))
        else:
            cv.darken(cv.disc(u - cx, v - cy, a, b, soft=0.2), rng.uniform(0.4, 0.9))
    if rng.random() < 0.5:  # a partial arc, like a limb or placenta edge
        theta = np.arctan2(v, u)
        start = rng.uniform(-math.pi, math.pi)
        arc = np.abs(np.angle(np.exp(1j * (theta - start)))) < rng.uniform(0.5, 1.3)
        cv.add(cv.ring(u, v, 0.9, 0.9, 0.05) * arc, 0.8)


_DRAW = {
    "Fetal brain": _brain,
    "Fetal thorax": _thorax,
    "Fetal abdomen": _abdomen,
    "Fetal femur": _femur,
    "Maternal cervix": _cervix,
    "Other": _other,
}


# How much of the true structure a look-alike keeps under its decoy: faint enough that a model
# trained on few of them takes the decoy's class, present enough that more of them teach it.
LOOK_ALIKE_TRACE = 0.4


def _look_alike(cv, u, v, rng, plane: str, decoy: str) -> None:
    """``plane``'s structure, faded to a trace, under ``decoy``'s at the same place."""
    before = cv.echo.copy()
    _DRAW[plane](cv, u, v, rng)
    cv.echo = before + LOOK_ALIKE_TRACE * (cv.echo - before)
    _DRAW[decoy](cv, u, v, rng)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def render_phantom(plane: str, rng: np.random.Generator, width: int = 512, height: int = 384,
                   banner: str = "", decoy: str | None = None) -> np.ndarray:
    """One phantom ultrasound image (HxW uint8) of ``plane``; with ``decoy``, a look-alike: the
    decoy class's structure over a faint trace of ``plane``'s (the label stays ``plane``)."""
    cv = _Canvas(height, width)
    apex_x, apex_y = width / 2 + rng.uniform(-0.03, 0.03) * width, 0.06 * height
    radius = 0.92 * height
    half_angle = math.radians(rng.uniform(32, 42))
    dx, dy = cv.x - apex_x, cv.y - apex_y
    depth = np.hypot(dx, dy)
    sector = (depth < radius) & (depth > 0.04 * height) & (np.abs(np.arctan2(dx, dy)) < half_angle)

    cv.echo += rng.uniform(0.18, 0.3)  # soft tissue
    for _ in range(rng.integers(2, 6)):  # distractor blobs in every class
        bu, bv = cv.local(rng.uniform(0.2, 0.8) * width, rng.uniform(0.25, 0.9) * height,
                          rng.uniform(0, math.pi), rng.uniform(0.03, 0.1) * height)
        cv.add(cv.disc(bu, bv, 1.0, rng.uniform(0.4, 1.0), soft=0.4), rng.uniform(-0.15, 0.25))

    scale = rng.uniform(0.16, 0.26) * height
    cx = apex_x + rng.uniform(-0.12, 0.12) * width
    cy = apex_y + rng.uniform(0.42, 0.62) * radius
    u, v = cv.local(cx, cy, rng.uniform(0, 2 * math.pi), scale)
    if decoy is None:
        _DRAW[plane](cv, u, v, rng)
    else:
        _look_alike(cv, u, v, rng, plane, decoy)

    gain = np.exp(-depth / radius * rng.uniform(0.3, 1.0))  # attenuation with depth
    speckle = rng.rayleigh(0.8, size=(height, width)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.2, sigmaY=0.7)
    image = np.clip(cv.echo, 0, None) * gain * speckle * rng.uniform(150, 230)
    image = cv2.GaussianBlur(image, (0, 0), 0.8) * sector
    image = np.clip(image, 0, 255).astype(np.uint8)

    if banner:  # burned-in annotation, as on real scanner exports
        pil = Image.fromarray(image)
        ImageDraw.Draw(pil).text((6, 4), banner, fill=235, font=_font(max(10, height // 28)))
        image = np.asarray(pil)
    return image


def _check_confuse(confuse: tuple[str, str] | None, share: float) -> None:
    if confuse is None:
        return
    unknown = [p for p in confuse if p not in CLASS_NAMES]
    if unknown or confuse[0] == confuse[1]:
        raise UserError(f"confuse {confuse[0]!r} with {confuse[1]!r}: expected two different planes of "
                        f"{', '.join(CLASS_NAMES)}")
    if not 0 <= share <= 1:
        raise UserError(f"confuse share {share}: expected a share between 0 and 1")


def refuse_existing_dataset(out: str, storage: StorageConfig | None = None) -> None:
    """Refuse a destination that already holds a dataset's CSV or images: :func:`synthesize`
    would replace them (a real dataset's labels among them), so replacing takes ``--overwrite``."""
    root = resolve(out, storage)
    has_images = any(e.type == pafs.FileType.File for e in root.join(IMAGES_DIR).entries(recursive=True))
    if root.join(CSV_NAME).exists() or has_images:
        raise UserError(f"{root.uri} already holds a dataset ({CSV_NAME} or {IMAGES_DIR}/); choose another "
                        f"folder or pass --overwrite")


def synthesize(out: str, per_class: int, seed: int = 0, width: int = 512, height: int = 384,
               train_fraction: float = 0.6, storage: StorageConfig | None = None,
               confuse: tuple[str, str] | None = None, confuse_share: float = 0.5) -> list[Record]:
    """Write a phantom FETAL_PLANES_DB (``Images/*.png`` + CSV) to a local folder or S3 prefix.

    Args:
        out: destination folder or ``s3://`` prefix.
        per_class: images per plane (the six classes are balanced).
        seed: everything is a function of it.
        width, height: image size in pixels.
        train_fraction: share of patients in the official train split (``Train`` = 1).
        confuse: (plane, look-alike plane): ``confuse_share`` of ``plane``'s images (drawn
            independently of everything else) look like the other plane, with a faint trace
            of their own; their label stays ``plane``. Every other image, and the CSV, are what
            they are without it.

    Returns:
        The records written, in CSV order.
    """
    _check_confuse(confuse, confuse_share)
    py_rng = random.Random(seed)
    planes = [p for p in CLASS_NAMES for _ in range(per_class)]
    py_rng.shuffle(planes)

    # Patients with 1-8 images each; the Train column is a property of the patient.
    groups, i = [], 0
    while i < len(planes):
        n = py_rng.randint(1, 8)
        groups.append(planes[i : i + n])
        i += n
    root = resolve(out, storage)
    records = []
    for pid, group in enumerate(groups, start=1):
        is_train = py_rng.random() < train_fraction
        operator, machine = py_rng.choice(OPERATORS), py_rng.choice(MACHINES)
        for k, plane in enumerate(group, start=1):
            name = f"Patient{pid:05d}_Plane{CLASS_NAMES.index(plane) + 1}_{k}_of_{len(group)}"
            brain = py_rng.choice(BRAIN_PLANES[:4]) if plane == "Fetal brain" else "Not A Brain"
            records.append(Record(name, pid, plane, brain, operator, machine, is_train))

    # Both splits must be non-empty for any sensible per_class.
    if len({r.official_train for r in records}) == 1 and len(groups) > 1:
        last = groups[-1]
        flipped = not records[-1].official_train
        records = records[: -len(last)] + [
            Record(r.image_name, r.patient, r.plane, r.brain_plane, r.operator, r.machine, flipped)
            for r in records[-len(last):]
        ]

    for idx, rec in enumerate(records):
        rng = np.random.default_rng([seed, idx])
        banner = (f"{rec.machine}  PHANTOM P{rec.patient:05d}  GA {rng.integers(18, 36)}w"
                  f"{rng.integers(0, 7)}d  MI 0.{rng.integers(5, 13)}")
        decoy = confuse[1] if confuse and rec.plane == confuse[0] and (
            np.random.default_rng([seed, idx, 1]).random() < confuse_share) else None
        image = render_phantom(rec.plane, rng, width, height, banner, decoy)
        ok, png = cv2.imencode(".png", image)
        root.join(IMAGES_DIR, rec.image_name + IMAGE_EXT).write_bytes(png.tobytes())
    root.join(CSV_NAME).write_text(write_csv(records))
    return records
