"""Image preprocessing: decode to grayscale, letterbox, augment, normalise.

Training, evaluation and labelling share these functions, so a bundle's model always sees its
input prepared the same way. Ultrasound is grayscale; every image becomes one 8-bit channel
here, and :class:`ModelInput` is the one place it is expanded to the backbone's three and
normalised. Albumentations is imported only for training augmentation: labelling actors start
without it (half a second of every actor's start-up on a 2-core machine).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from fpc_ray.config import AugmentConfig

if TYPE_CHECKING:
    import albumentations as A
    import torch

# The most pixels one object may decode to, all its frames together: the decompression bomb
# guard of training and labelling alike, checked from the header before any decoder allocates
# (PIL's own guard, a process-wide setting, is left as it is: it refuses only far larger images).
# Ultrasound frames and cines are far below.
MAX_PIXELS = 64_000_000


class TooManyPixels(ValueError):
    """An image whose header claims more than :data:`MAX_PIXELS`: refused before decoding."""


def check_pixels(width: int, height: int, frames: int = 1, what: str = "") -> None:
    """Refuse ``frames`` images of ``width x height`` over :data:`MAX_PIXELS`, before decoding.

    Raises:
        TooManyPixels: naming the size and the limit (``what`` says what claimed it).
    """
    if width * height * frames > MAX_PIXELS:
        count = f"{frames} x " if frames > 1 else ""
        raise TooManyPixels(f"{what}{count}{width}x{height} pixels exceeds the limit of {MAX_PIXELS}")


def to_gray_u8(image: np.ndarray, significant_bits: int | None = None) -> np.ndarray:
    """Any HxW / HxWxC array (8- or 16-bit, gray, RGB, RGBA) as an HxW uint8 image.

    ``significant_bits``: how many bits of a deeper-than-8-bit sample carry data, where the
    file declares it (see :func:`_to_u8_range`).
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"unsupported image shape {arr.shape}")
    arr = _to_u8_range(arr, significant_bits)
    if arr.ndim == 3:
        luma = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        arr = np.clip(luma, 0, 255).round().astype(np.uint8)
    return arr


def _to_u8_range(arr: np.ndarray, significant_bits: int | None = None) -> np.ndarray:
    """Scale integers wider than 8 bits to 0..255 by a bit depth, never by the image's own range
    (which would change a pixel's brightness with the brightest one): the ``significant_bits``
    the file declares (at most the container's); else the first of 8, 12 and the container's
    depth that holds the maximum. So 12-bit data in a 16-bit container comes out full range
    (4080 is 4080/4095, not 4080/65535: near black), an 8-bit image stored as 16 bits (x257) as
    it was, and a 16-bit image darker than 1/16 of white is taken for 12-bit data."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 1:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = max(int(arr.max()), 0) if arr.size else 0
        container = int(np.iinfo(arr.dtype).max).bit_length()
        if significant_bits:
            bits = min(max(significant_bits, top.bit_length()), container)
        else:
            bits = next(b for b in (8, 12, container) if top < 2**b or b == container)
        return np.clip(arr.astype(np.float32) * (255.0 / (2**bits - 1)), 0, 255).round().astype(np.uint8)
    return np.clip(arr, 0, 255).round().astype(np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Offsets in a PNG of IHDR's bit depth and colour type (IHDR is the first chunk).
_PNG_BIT_DEPTH, _PNG_COLOR_TYPE = 24, 25


def png_significant_bits(data: bytes) -> int | None:
    """The bits per sample a PNG's ``sBIT`` chunk declares carry data (a 12-bit scanner's image
    saved as 16-bit PNG may say 12), the most over its colour channels; None where it has no
    such chunk. Read from the chunks before the pixel data (PIL does not parse ``sBIT``)."""
    if not data.startswith(PNG_SIGNATURE) or len(data) <= _PNG_COLOR_TYPE:
        return None
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"sBIT":
            body = data[pos + 8:pos + 8 + length]
            if data[_PNG_COLOR_TYPE] in (4, 6):  # gray + alpha, RGBA: the alpha's bits say nothing of the image
                body = body[:-1]
            return max(body, default=0) or None
        if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data or not at all
            return None
        pos += 12 + length
    return None


# The raster formats we decode. Pillow would otherwise try every plugin it has (TIFF, PSD, EPS,
# GIF...), each a parser of its own that an archive object could aim at.
IMAGE_FORMATS = ("PNG", "JPEG")


def open_image(data: bytes) -> Image.Image:
    """Open PNG / JPEG bytes lazily (only the header is read), refusing every other format.

    PIL has a pixel limit of its own (a warning past 89 MP, an error past 179 MP): ours is the one
    that counts, so PIL's warning is silenced here and its error reported as ours.

    Raises:
        PIL.UnidentifiedImageError: not a PNG or JPEG.
        TooManyPixels: past PIL's own limit (any size past ours is refused by :func:`check_pixels`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise TooManyPixels(f"{claimed.group(1) if claimed else 'more than 179M'} pixels exceeds the limit of "
                            f"{MAX_PIXELS}") from None


def decode_image_bytes(data: bytes) -> np.ndarray:
    """PNG / JPEG bytes to an HxW uint8 grayscale array.

    Raises:
        TooManyPixels: the header claims more than :data:`MAX_PIXELS` (nothing is decoded).
    """
    with open_image(data) as im:
        check_pixels(*im.size)
        if im.format == "PNG" and data[_PNG_BIT_DEPTH] == 16 and im.mode in ("RGB", "RGBA", "LA"):
            return to_gray_u8(_decode_png16_color(data), png_significant_bits(data))
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("I;16", "I;16B", "I;16L"):
            return to_gray_u8(np.asarray(im).astype(np.uint16), png_significant_bits(data))
        elif im.mode == "I":
            return to_gray_u8(np.asarray(im), png_significant_bits(data))
        elif im.mode not in ("L", "RGB", "RGBA", "LA"):
            im = im.convert("RGB")
        arr = np.asarray(im)
        if im.mode == "LA":
            arr = arr[..., 0]
    return to_gray_u8(arr)


def _decode_png16_color(data: bytes) -> np.ndarray:
    """A 16-bit colour (or gray + alpha) PNG as HxWx3 uint16 RGB, alpha dropped: PIL keeps only
    the high byte of such samples, which leaves 12-bit data at 0..15. The caller has checked
    the size from the header."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("PNG image data is incomplete or corrupt")
    return bgr[..., ::-1]


def letterbox_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``h x w`` frame lies in its ``size`` letterbox: ``(top, left, height, width)``.

    The one definition of the geometry: CAM thumbnails crop the padding away with it.
    """
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size``, keeping the aspect ratio, and pad to a square.

    Padding is black, like the background of an ultrasound sector, and centred.
    """
    h, w = gray.shape[:2]
    top, left, nh, nw = letterbox_box(h, w, size)
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (nw, nh), interpolation=interp)
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + nh, left : left + nw] = resized
    return out


class ModelInput:
    """Letterboxed HxW uint8 -> normalised 3xHxW float tensor, after an optional augmentation.

    Called like an albumentations transform (``t(image=x)["image"]``), so datasets take either.
    The arithmetic is albumentations' ``ToRGB`` + ``Normalize(max_pixel_value=255)`` +
    ``ToTensorV2`` (a test holds them equal): bundles trained before this class see the same input.
    """

    def __init__(self, mean, std, augment: A.Compose | None = None):
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(3, 1, 1)
        self.offset = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(3, 1, 1)
        self.augment = augment

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        import torch  # here, not at the top: decoding (labelling's CPU tasks) never needs torch

        if self.augment is not None:
            image = self.augment(image=image)["image"]
        gray = np.asarray(image, np.float32)[None]  # 1xHxW: the three channels are equal
        return {"image": torch.from_numpy(gray * self.scale - self.offset)}


def eval_transform(mean, std) -> ModelInput:
    """Letterboxed HxW uint8 -> normalised 3xHxW float tensor, deterministic."""
    return ModelInput(mean, std)


def train_transform(aug: AugmentConfig, mean, std, seed: int | None = None) -> ModelInput:
    """Ultrasound-sensible augmentation on the letterboxed image, then the eval steps.

    Small rotations, scale and shifts (probe position), horizontal flips (probe orientation),
    brightness / contrast / gamma (gain and machine presets), noise (speckle) and blur.
    """
    import albumentations as A

    steps = []
    if aug.rotate_limit or aug.scale_limit or aug.shift_limit:
        steps.append(
            A.Affine(
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                translate_percent=(-aug.shift_limit, aug.shift_limit),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.8,
            )
        )
    steps += [
        A.HorizontalFlip(p=aug.hflip_p),
        A.RandomBrightnessContrast(0.2, 0.2, p=aug.brightness_contrast_p),
        A.RandomGamma((80, 120), p=aug.gamma_p),
        A.GaussNoise(std_range=(0.02, 0.08), p=aug.noise_p),
        A.GaussianBlur(blur_limit=(3, 5), p=aug.blur_p),
    ]
    return ModelInput(mean, std, A.Compose(steps, seed=seed))

