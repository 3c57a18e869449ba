"""The one-stage labelling design (the CPU path): a pool of Ray actors that each hold the model
and turn a batch of listed objects into :data:`LABEL_SCHEMA` rows.

Inside an actor, :class:`ReadDecode` reads and decodes the batch's objects on a small thread pool
(PIL, OpenCV, pyarrow and pylibjpeg release the GIL), yielding frames already letterboxed to the
model's input size and shrunk to thumbnail size; :class:`Predictor` classifies them and draws
the CAM thumbnails. One Ray Data stage instead of two: on a CPU node, handing per-frame pixel
columns from a decode stage to a predict stage through Arrow blocks cost more CPU than the
decoding itself. GPU nodes run the split design instead (:mod:`fpc_ray.label.split`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from fpc_ray.data.transforms import eval_transform
from fpc_ray.inference import transform_batch
from fpc_ray.label.classify import Classifier
from fpc_ray.label.frames import DEFAULT_MAX_OBJECT_BYTES, ReadDecode, error_row, printable_name
from fpc_ray.label.rows import PASSED_THROUGH, cam_thumbnail, draw_cams, label_table, optional_column

# Where tests and benchmarks have always found them.
__all__ = ["DEFAULT_MAX_OBJECT_BYTES", "FRAMES_PER_PASS", "Predictor", "ReadDecode", "cam_thumbnail",
           "draw_cams", "error_row", "optional_column", "printable_name"]

FRAMES_PER_PASS = 256  # frames per forward pass: fills a GPU, bounds a CPU actor's activations


class Predictor:
    """Batch of listed objects -> a LABEL_SCHEMA table. Loads the bundle once per actor."""

    def __init__(self, model_uri: str, storage: dict | None, cam: str, use_gpu: bool, run_id: str,
                 thumb_size: int = 128, frame_stride: int = 1, torch_threads: int | None = None,
                 decode_threads: int = 2, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 uid_key: str | None = None):
        if torch_threads:
            # Ray pins torch to the actor's reserved CPUs (one); inference is the bottleneck,
            # so the driver lets each CPU predictor use its share of the node's cores.
            torch.set_num_threads(torch_threads)
        self.classifier = Classifier(model_uri, storage, cam, use_gpu)
        self.size = self.classifier.size
        self.transform = eval_transform(self.classifier.mean, self.classifier.std)
        self.run_id = run_id
        self.reader = ReadDecode(storage, self.size, thumb_size, frame_stride, max_object_bytes, uid_key)
        self.pool = ThreadPoolExecutor(max_workers=decode_threads)

    def _infer(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Probabilities and CAMs of letterboxed frames, at most FRAMES_PER_PASS in one forward pass:
        a batch of cine loops holds thousands of frames, and one tensor of them all would not fit."""
        probs, cams = [], []
        for i in range(0, len(images), FRAMES_PER_PASS):
            p, c = self.classifier.classify(transform_batch(images[i:i + FRAMES_PER_PASS], self.transform,
                                                            self.classifier.device))
            probs.append(p.cpu().numpy())
            cams = None if c is None else cams + list(c.cpu().numpy() if isinstance(c, torch.Tensor) else c)
        return np.concatenate(probs), cams

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        uris = [str(u) for u in batch["uri"]]
        sizes = optional_column(batch, "size", len(uris), int)
        listing_errors = optional_column(batch, "listing_error", len(uris), str)
        frames = [row for rows in self.pool.map(self.reader.frames, uris, sizes, listing_errors) for row in rows]
        ok = [i for i, row in enumerate(frames) if row["error"] is None]
        n_classes = len(self.classifier.class_names)
        probs, cams = self._infer([frames[i]["pixels"] for i in ok]) if ok else (np.zeros((0, n_classes)), None)
        # cv2 drops the GIL: thumbnails are drawn on the decode threads
        pngs = None if cams is None else draw_cams(self.pool, cams, [frames[i] for i in ok], self.size)
        passed = {key: [row[key] for row in frames] for key in PASSED_THROUGH}
        return label_table(passed, ok, probs, pngs, self.classifier.class_names, self.classifier.version,
                           self.run_id)

