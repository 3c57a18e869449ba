"""The GPU-node labelling design: CPU tasks decode, GPU actors classify, CPU tasks draw.

1. :func:`~fpc_ray.label.handover.decode_stage` (Ray Data tasks, one CPU each, on every core
   the cluster has): read, hash, decode and letterbox each object's frames
   (:class:`~fpc_ray.label.frames.ReadDecode`, the CPU path's own step) and hand them over as
   fixed-size uint8 arrays: the letterboxed input, the thumbnail padded to ``thumb_size`` square
   with its true size, the passed-through columns. JPEG frames a batched decoder takes are
   handed over as codestreams instead. Error rows pass through with zero pixels.
2. :class:`SplitPredictor` (actors holding a GPU share, no CPU): decode the codestreams in one
   batched call (nvJPEG), letterbox and thumbnail them on the GPU, classify hundreds of frames a
   call, and hand over probabilities and CAM maps (float16, feature-map resolution). No PNG here.
3. :func:`~fpc_ray.label.handover.overlay_stage` (Ray Data tasks): CAM overlays, PNG,
   :data:`~fpc_ray.label.schema.LABEL_SCHEMA` rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from fpc_ray.data.transforms import letterbox
from fpc_ray.label.classify import Classifier
from fpc_ray.label.decode import DecodeError, decode_raster
from fpc_ray.label.frames import thumbnail
from fpc_ray.label.handover import frame_block, passed_columns, tensor_column
from fpc_ray.label.schema import error_text
from fpc_ray.label.torch_frames import by_size, decode_jpegs, gray_frames, letterbox_frames, thumbnail_frames

MAX_CAM_SIDE = 56  # CAM maps handed over larger than this (pytorch-grad-cam's, at input size) are shrunk


class SplitPredictor:
    """Frames handed over by the decode stage -> probabilities and CAM maps (see the module
    docstring). Loads the bundle once per actor."""

    def __init__(self, model_uri: str, storage: dict | None, cam: str, use_gpu: bool, thumb_size: int,
                 frames_per_pass: int, torch_threads: int | None = None):
        from fpc_ray.data.transforms import eval_transform

        if torch_threads:  # a CPU predictor (tests, or a CPU node told to split): its share of the cores
            torch.set_num_threads(torch_threads)
        self.classifier = Classifier(model_uri, storage, cam, use_gpu)
        self.device = self.classifier.device
        self.size, self.thumb_size, self.frames_per_pass = self.classifier.size, thumb_size, frames_per_pass
        normalise = eval_transform(self.classifier.mean, self.classifier.std)  # its arithmetic, batched here
        self.scale = torch.from_numpy(normalise.scale)[None].to(self.device)
        self.offset = torch.from_numpy(normalise.offset)[None].to(self.device)
        # One frame through the model now: the CAM maps' shape (every block hands over the same
        # columns) and the device's warm-up, before the first batch arrives.
        _, cams = self._classify(np.zeros((1, self.size, self.size), np.uint8))
        self.cam_shape = None if cams is None else cams.shape[1:]

    def _classify(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Letterboxed uint8 frames -> probabilities and CAM maps (float16), ``frames_per_pass``
        frames per forward pass."""
        from fpc_ray.inference import to_device

        probs, cams = [], []
        for start in range(0, len(frames), self.frames_per_pass):
            u8 = torch.from_numpy(frames[start:start + self.frames_per_pass])
            if self.device.type == "cuda":
                u8 = u8.pin_memory()  # the copy to the GPU runs asynchronously
            batch = to_device(u8.to(self.device, non_blocking=True).float()[:, None] * self.scale - self.offset,
                              self.device)
            p, c = self.classifier.classify(batch)
            probs.append(p.cpu().numpy())
            if c is not None:
                cams.append(_small_cams(torch.as_tensor(c)))
        n_classes = len(self.classifier.class_names)
        return (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
                np.concatenate(cams) if cams else None)

    def _decode_jpegs(self, todo: list[int], batch: dict, passed: dict, pixels: np.ndarray,
                      thumbs: np.ndarray, sizes: np.ndarray) -> None:
        """The frames handed over as codestreams, decoded, letterboxed and thumbnailed into the
        arrays; a frame no decoder takes becomes its error row."""
        done = decode_codestreams([batch["jpeg"][i] for i in todo],
                                  [(passed["height"][i], passed["width"][i]) for i in todo],
                                  self.device, self.size, self.thumb_size)
        for i, result in zip(todo, done, strict=True):
            if isinstance(result, str):  # as the CPU path reports it (for a cine: this frame's row)
                passed["error"][i] = result
                for key in ("width", "height", "input_kind"):
                    passed[key][i] = None
                continue
            pixels[i], small = result
            thumbs[i, :small.shape[0], :small.shape[1]] = small
            sizes[i] = small.shape

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        passed = passed_columns(batch)
        pixels, thumbs = batch["pixels"], batch["thumb"]
        sizes = np.stack([batch["thumb_h"], batch["thumb_w"]], axis=1).astype(np.int32)
        todo = [i for i, c in enumerate(batch["jpeg"]) if c is not None and passed["error"][i] is None]
        if todo:  # writable copies: the frames decoded here land in them
            pixels, thumbs = np.array(pixels), np.array(thumbs)
            self._decode_jpegs(todo, batch, passed, pixels, thumbs, sizes)
        ok = [i for i, error in enumerate(passed["error"]) if error is None]
        probs, cams = self._classify(pixels[ok])
        n = len(pixels)
        all_probs = np.zeros((n, len(self.classifier.class_names)), np.float32)
        all_probs[ok] = probs
        arrays = {"thumb": tensor_column(thumbs), "thumb_h": pa.array(sizes[:, 0]), "thumb_w": pa.array(sizes[:, 1]),
                  "probs": tensor_column(all_probs)}
        if self.cam_shape is not None:
            all_cams = np.zeros((n, *self.cam_shape), np.float16)
            if cams is not None:
                all_cams[ok] = cams
            arrays["cam"] = tensor_column(all_cams)
        return frame_block(passed, arrays)


def _small_cams(cams: torch.Tensor) -> np.ndarray:
    """CAM maps as handed over: float16, at most MAX_CAM_SIDE square (GradCAM's feature-map maps
    are smaller already; the overlay enlarges them either way)."""
    cams = cams.float()
    if max(cams.shape[1:]) > MAX_CAM_SIDE:
        cams = torch.nn.functional.interpolate(cams[:, None], size=(MAX_CAM_SIDE, MAX_CAM_SIDE), mode="area")[:, 0]
    return cams.to(torch.float16).cpu().numpy()


def decode_codestreams(codestreams: list[bytes], sizes: list[tuple[int, int]], device: torch.device,
                       input_size: int, thumb_size: int) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """JPEG codestreams of frames of the given (height, width) -> each frame's letterboxed input
    and thumbnail, or its ``"kind: detail"`` error.

    Decoded in one batched call on ``device`` and letterboxed there (:mod:`torch_frames`); a
    frame that decoder refuses is decoded by the CPU path's decoder instead.
    """
    grays = gray_frames(decode_jpegs(codestreams, device), sizes)
    done: list = [None] * len(codestreams)
    decoded = [(i, gray) for i, gray in enumerate(grays) if gray is not None]
    for idx, stack in by_size([gray for _, gray in decoded]):
        boxed = letterbox_frames(stack, input_size).cpu().numpy()
        small = thumbnail_frames(stack, thumb_size)[0].cpu().numpy()
        for k, j in enumerate(idx):
            done[decoded[j][0]] = (boxed[k], small[k])
    for i, gray in enumerate(grays):
        if gray is None:  # refused (corrupt, or a variant the decoder lacks): the CPU decoder's turn
            done[i] = _decode_on_cpu(codestreams[i], input_size, thumb_size)
    return done


def _decode_on_cpu(codestream: bytes, input_size: int, thumb_size: int) -> tuple[np.ndarray, np.ndarray] | str:
    from fpc_ray.errors import private_reason

    try:
        gray = decode_raster(codestream)
        return letterbox(gray, input_size), thumbnail(gray, thumb_size)
    except DecodeError as e:
        return str(e)
    except MemoryError:
        return error_text("too_large", "ran out of memory")
    except Exception as e:  # this frame's failure only
        return error_text("malformed", private_reason(e))
