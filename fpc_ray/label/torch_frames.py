"""JPEG frames decoded in batches by torchvision (nvJPEG on CUDA) and letterboxed in torch, for
the GPU predictors of :mod:`fpc_ray.label.split`.

The frames must come out as the CPU path makes them (:mod:`fpc_ray.label.frames`): PIL's or
pydicom's decoder, :func:`fpc_ray.data.transforms.to_gray_u8`'s luma, then
:func:`~fpc_ray.data.transforms.letterbox`'s OpenCV resize. The geometry is ``letterbox_box``'s;
OpenCV's interpolation is separable, so it is written here as two matrices per size (INTER_AREA
shrinking: each output pixel averages the input pixels it covers, by the fraction covered;
INTER_AREA enlarging and INTER_LINEAR: two neighbours): a batched matmul on the device gives
OpenCV's values to float rounding (INTER_AREA shrinking exactly; otherwise within one gray level,
OpenCV rounding its weights to 11 bits).
What remains is the JPEG decoders' own difference (nvJPEG and libjpeg-turbo may round the IDCT
and the chroma upsampling differently): tests hold the frames within a mean of 2 and a maximum of
24 gray levels. A frame nvJPEG refuses is decoded by the CPU decoder instead, in the same run.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from fpc_ray.data.transforms import letterbox_box

_LUMA = (0.299, 0.587, 0.114)  # to_gray_u8's weights (ITU-R BT.601)
_GROUP_FRAMES = 64  # frames resized in one matmul: bounds the float copies of large frames


@functools.lru_cache(maxsize=128)
def resize_weights(n_in: int, n_out: int, area: bool) -> np.ndarray:
    """The ``n_out x n_in`` matrix of OpenCV's resize along one axis (INTER_AREA or INTER_LINEAR)."""
    scale = n_in / n_out
    out = np.arange(n_out, dtype=np.float64)
    if area and n_out <= n_in:  # output pixel i, [i*s, (i+1)*s), averages the input pixels it overlaps
        pixels = np.arange(n_in, dtype=np.float64)[None, :]
        overlap = np.minimum((out[:, None] + 1) * scale, pixels + 1) - np.maximum(out[:, None] * scale, pixels)
        return (np.clip(overlap, 0, None) / scale).astype(np.float32)
    if area:  # INTER_AREA enlarging: OpenCV blends two neighbours only across a source pixel's edge
        left = np.floor(out * scale)
        frac = (out + 1) - (left + 1) / scale
        frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    else:  # INTER_LINEAR: half-pixel centres
        src = np.maximum((out + 0.5) * scale - 0.5, 0.0)
        left = np.floor(src)
        frac = src - left
    left = np.minimum(left.astype(np.int64), n_in - 1)
    weights = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1 - frac)
    np.add.at(weights, (rows, np.minimum(left + 1, n_in - 1)), frac)
    return weights.astype(np.float32)


def resize(frames: torch.Tensor, height: int, width: int, area: bool) -> torch.Tensor:
    """N x h x w float frames -> N x height x width uint8, as OpenCV resizes them."""
    wy = torch.from_numpy(resize_weights(frames.shape[1], height, area)).to(frames.device)
    wx = torch.from_numpy(resize_weights(frames.shape[2], width, area)).to(frames.device)
    return (wy @ frames @ wx.T).round_().clamp_(0, 255).to(torch.uint8)


def letterbox_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """N x h x w gray frames (float, integral values) -> N x size x size uint8, as ``letterbox``."""
    n, h, w = frames.shape
    top, left, nh, nw = letterbox_box(h, w, size)
    out = torch.zeros((n, size, size), dtype=torch.uint8, device=frames.device)
    out[:, top:top + nh, left:left + nw] = resize(frames, nh, nw, area=size < max(h, w))
    return out


def thumbnail_frames(frames: torch.Tensor, thumb_size: int) -> tuple[torch.Tensor, int, int]:
    """N x h x w gray frames -> their thumbnails (INTER_AREA, as ``frames.thumbnail``), with the
    thumbnails' height and width."""
    _, h, w = frames.shape
    _, _, th, tw = letterbox_box(h, w, thumb_size)
    return resize(frames, th, tw, area=True), th, tw


@functools.lru_cache(maxsize=8)
def _luma(device: torch.device) -> torch.Tensor:
    # Made once per device: a new one per frame would be a blocking host-to-GPU copy per frame.
    return torch.tensor(_LUMA, dtype=torch.float32, device=device)[:, None, None]


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """3 x h x w uint8 -> h x w float of integral values: ``to_gray_u8``'s luma, rounded."""
    return (rgb.float() * _luma(rgb.device)).sum(0).round_().clamp_(0, 255)


def decode_jpegs(codestreams: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each codestream decoded to 3 x h x w uint8 RGB on ``device`` (one batched call), or None
    where the decoder refused it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in codestreams]
    with warnings.catch_warnings():  # libjpeg's "corrupt data" warnings: the checks below decide
        warnings.simplefilter("ignore")
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except Exception as e:  # one refused codestream fails the batch: find it
            _tell_fallback_once(device, e)
            return [_decode_one(t, device) for t in tensors]


_told_fallback: set[str] = set()


def _tell_fallback_once(device: torch.device, error: Exception) -> None:
    """One line per process and device: a slow cine run says why, without a line per batch."""
    if str(device) not in _told_fallback:
        _told_fallback.add(str(device))
        print(f"batched JPEG decoding on {device} refused a batch ({(str(error).splitlines() or [''])[0][:120]}): "
              "its frames are decoded one at a time, those refused on the CPU", flush=True)


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device)
    except Exception:  # refused: the caller's CPU decoder decides, and reports, what it is
        return None


def gray_frames(decoded: list[torch.Tensor | None], sizes: list[tuple[int, int]]) -> list[torch.Tensor | None]:
    """Decoded RGB frames as gray, None where the decoder refused the frame or its size is not the
    one the header gave (the CPU decoder then decodes it)."""
    return [None if rgb is None or tuple(rgb.shape) != (3, h, w) else to_gray(rgb)
            for rgb, (h, w) in zip(decoded, sizes, strict=True)]


def by_size(frames: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Frames grouped by size (the frames of a cine share one), each group stacked, at most
    ``_GROUP_FRAMES`` to a stack: ``(indices into frames, N x h x w)``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
        groups.setdefault(tuple(frame.shape), []).append(i)
    return [(idx[k:k + _GROUP_FRAMES], torch.stack([frames[i] for i in idx[k:k + _GROUP_FRAMES]]))
            for idx in groups.values() for k in range(0, len(idx), _GROUP_FRAMES)]
