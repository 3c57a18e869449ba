"""The labelling stage: a pool of Ray actors that each hold the model and turn a batch of listed
objects into :data:`LABEL_SCHEMA` rows.

Inside an actor, :class:`ReadDecode` reads and decodes the batch's objects on a small thread pool
(PIL, OpenCV, pyarrow and pylibjpeg release the GIL), yielding frames already letterboxed to the
model's input size and shrunk to thumbnail size; :class:`Predictor` classifies them and draws
the CAM thumbnails. One Ray Data stage instead of two: handing per-frame pixel columns from a
decode stage to a predict stage through Arrow blocks cost more CPU than the decoding itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pyarrow as pa
import torch

from fpc_ray.data.transforms import eval_transform, letterbox, letterbox_box
from fpc_ray.errors import private_reason
from fpc_ray.inference import autocast, place_model, select_device, transform_batch
from fpc_ray.label.decode import DecodeError, decode_object
from fpc_ray.label.schema import LABEL_SCHEMA, error_kind, error_text

_PASSED_THROUGH = ("source_uri", "frame", "study_uid", "series_uid", "sop_uid", "width", "height",
                   "content_sha256", "error")


FRAMES_PER_PASS = 256  # frames per forward pass: fills a GPU, bounds a CPU actor's activations
DEFAULT_MAX_OBJECT_BYTES = 2 * 1024**3  # generous for cine loops; a bigger object is an error row
_READ_CHUNK = 64 * 1024**2
# The object is no longer there to read: deleted, or replaced by a folder, after the listing.
_VANISHED = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def error_row(uri: str, error: str, sha256: str | None = None) -> dict:
    """The one row of an object that yields no frames: ``error`` is ``"kind: detail"``."""
    return {"source_uri": uri, "content_sha256": sha256, "study_uid": None, "series_uid": None,
            "sop_uid": None, "frame": 0, "width": None, "height": None, "error": error,
            "pixels": None, "thumb": None}


def printable_name(uri: str) -> str:
    """``uri`` as a valid UTF-8 string: undecodable bytes (surrogate escapes) shown as ``\\xNN``."""
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        return os.fsencode(uri).decode("utf-8", "backslashreplace")


class ReadDecode:
    """One listed object -> its frame rows.

    Every failure that belongs to the object (its name, size, disappearance, bytes, decoding,
    letterbox or thumbnail) is an error row; only the infrastructure's failures raise (storage
    errors other than not-found, e.g. an outage after the filesystem's retries), so a run that
    could not read its input never commits.
    """

    def __init__(self, storage: dict | None, input_size: int, thumb_size: int, frame_stride: int,
                 max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES, uid_key: str | None = None):
        from fpc_ray.config import StorageConfig

        self.storage = StorageConfig.model_validate(storage or {})
        self.input_size = input_size
        self.thumb_size = thumb_size
        self.frame_stride = frame_stride
        self.max_object_bytes = max_object_bytes
        self.uid_key = uid_key
        self._fs = None  # built on first use, in the worker process

    def _read(self, uri: str, size: int | None) -> bytes | None:
        """The object's bytes, or None when it holds more than ``max_object_bytes``.

        Never reads more than the cap plus one byte, even where the listing's size is stale.
        """
        from fpc_ray.storage import resolve

        loc = resolve(uri, self.storage, self._fs)
        self._fs = loc.fs
        limit = self.max_object_bytes + 1
        with loc.fs.open_input_stream(loc.path) as f:
            # One read of the listed size (plus one, to notice growth) keeps the common case a
            # single buffer; chunks after it cover a stale or unknown size.
            chunk = f.read(min(limit, size + 1 if size is not None else _READ_CHUNK))
            chunks, total = [chunk], len(chunk)
            while chunk and total < limit:
                chunk = f.read(min(limit - total, _READ_CHUNK))
                if chunk:
                    chunks.append(chunk)
                    total += len(chunk)
        if total > self.max_object_bytes:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def frames(self, uri: str, size: int | None = None, listing_error: str | None = None) -> list[dict]:
        """One object -> its frame rows (or its one error row).

        Args:
            uri: the object's URI.
            size: its size in bytes by the listing; None if unknown (only the bounded read applies).
            listing_error: a ``"kind: detail"`` line when the listing could not represent the
                object (a name that is not UTF-8); the object is not read.

        Raises:
            OSError: storage failures other than not-found (infrastructure: the run must fail).
        """
        if listing_error:  # re-checked: a kind outside ERROR_KINDS is the lister's bug
            kind = error_kind(listing_error)
            return [error_row(printable_name(uri), error_text(kind, listing_error[len(kind) + 1:]))]
        if printable_name(uri) != uri:  # a string column cannot hold it, and a row must name it
            return [error_row(printable_name(uri), error_text("bad_name", "the name is not valid UTF-8"))]
        cap = self.max_object_bytes
        if size is not None and size > cap:  # refused from the listing, without reading a byte
            return [error_row(uri, error_text("too_large", f"{size} bytes, over the per-object cap of {cap}"))]
        try:
            data = self._read(uri, size)
        except _VANISHED as e:
            return [error_row(uri, error_text("vanished", f"listed but no longer readable ({type(e).__name__})"))]
        except ValueError as e:  # pyarrow refuses the key itself (an empty path component: "a//b")
            detail = f"the storage cannot address this name ({type(e).__name__})"
            return [error_row(uri, error_text("bad_name", detail))]
        except OSError as e:
            from fpc_ray.storage import is_outage

            if is_outage(e):  # the infrastructure's failure: the run must fail, not commit error rows
                raise
            # This object's own refusal (no permission, an archived storage class, a KMS key the
            # role lacks): its row; if every object is refused, --max-error-rate fails the run.
            return [error_row(uri, error_text("unreadable", f"the storage refused to read it ({private_reason(e)})"))]
        if data is None:
            return [error_row(uri, error_text("too_large", f"over the per-object cap of {cap} bytes "
                                                           f"(the listing said {size})"))]
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            return self._frame_rows(uri, data, sha256)
        except DecodeError as e:
            return [error_row(uri, str(e), sha256)]
        except MemoryError:
            return [error_row(uri, error_text("too_large", "ran out of memory"), sha256)]
        except Exception as e:  # letterbox or thumbnail of an odd frame: this object's failure only
            return [error_row(uri, error_text("malformed", private_reason(e)), sha256)]

    def _frame_rows(self, uri: str, data: bytes, sha256: str) -> list[dict]:
        decoded = decode_object(uri, data, self.frame_stride, self.uid_key)
        base = {"source_uri": uri, "content_sha256": sha256, **decoded.uids}
        rows = []
        for index, gray in decoded.frames:
            h, w = gray.shape
            _, _, th, tw = letterbox_box(h, w, self.thumb_size)  # the frame's size, long side thumb_size
            thumb = cv2.resize(gray, (tw, th), interpolation=cv2.INTER_AREA)
            rows.append({**base, "frame": index, "width": w, "height": h, "error": None,
                         "pixels": letterbox(gray, self.input_size), "thumb": thumb})
        return rows


def cam_thumbnail(cam: np.ndarray, thumb: np.ndarray, width: int, height: int, size: int) -> bytes:
    """Overlay a CAM (any resolution, over the letterboxed input) on the frame's thumbnail; PNG.

    The CAM is brought to the letterboxed input size, cropped to where the frame lies inside
    the padding, and resized onto the thumbnail, so the heat lies on the anatomy it explains.
    """
    cam_full = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    top, left, nh, nw = letterbox_box(height, width, size)
    region = cam_full[top:top + nh, left:left + nw]
    th, tw = thumb.shape
    heat = cv2.resize(region, (tw, th), interpolation=cv2.INTER_LINEAR)
    color = cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), cv2.COLORMAP_JET)
    base = cv2.cvtColor(thumb, cv2.COLOR_GRAY2BGR)
    ok, png = cv2.imencode(".png", cv2.addWeighted(base, 0.55, color, 0.45, 0))
    if not ok:
        raise ValueError("the CAM thumbnail could not be encoded as PNG")
    return png.tobytes()


class Predictor:
    """Batch of listed objects -> a LABEL_SCHEMA table. Loads the bundle once per actor."""

    def __init__(self, model_uri: str, storage: dict | None, cam: str, use_gpu: bool, run_id: str,
                 thumb_size: int = 128, frame_stride: int = 1, torch_threads: int | None = None,
                 decode_threads: int = 2, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 uid_key: str | None = None):
        from fpc_ray.bundle import load_bundle
        from fpc_ray.config import StorageConfig

        if torch_threads:
            # Ray pins torch to the actor's reserved CPUs (one); inference is the bottleneck,
            # so the driver lets each CPU predictor use its share of the node's cores.
            torch.set_num_threads(torch_threads)

        bundle = load_bundle(model_uri, StorageConfig.model_validate(storage or {}))
        self.device = select_device(use_gpu)
        self.model = place_model(bundle.model, self.device).eval()
        self.class_names = bundle.class_names
        self.version = bundle.version
        self.size = bundle.card["input"]["size"]
        self.transform = eval_transform(bundle.card["input"]["mean"], bundle.card["input"]["std"])
        self.cam = cam
        self.run_id = run_id
        self.reader = ReadDecode(storage, self.size, thumb_size, frame_stride, max_object_bytes, uid_key)
        self.pool = ThreadPoolExecutor(max_workers=decode_threads)

    def _infer(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Probabilities and CAMs of letterboxed frames, at most FRAMES_PER_PASS in one forward pass:
        a batch of cine loops holds thousands of frames, and one tensor of them all would not fit."""
        parts = [self._infer_pass(images[i:i + FRAMES_PER_PASS]) for i in range(0, len(images), FRAMES_PER_PASS)]
        probs = np.concatenate([p for p, _ in parts])
        cams = None if parts[0][1] is None else [cam for _, c in parts for cam in c]
        return probs, cams

    def _infer_pass(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        from fpc_ray.label.cam import predict_with_gradcam, predict_with_library_cam

        batch = transform_batch(images, self.transform, self.device)
        if self.cam == "none":
            with torch.inference_mode(), autocast(self.device):
                probs = self.model(batch).float().softmax(dim=1)
            return probs.cpu().numpy(), None
        if self.cam == "gradcam":
            with autocast(self.device):
                probs, cams = predict_with_gradcam(self.model, batch)
            return probs.float().cpu().numpy(), list(cams.float().cpu().numpy())
        probs, maps = predict_with_library_cam(self.model, batch, self.cam)
        return probs.float().cpu().numpy(), list(maps)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        uris = [str(u) for u in batch["uri"]]
        sizes = _optional_column(batch, "size", len(uris), int)
        listing_errors = _optional_column(batch, "listing_error", len(uris), str)
        frames = [row for rows in self.pool.map(self.reader.frames, uris, sizes, listing_errors) for row in rows]
        n = len(frames)
        ok = [i for i, row in enumerate(frames) if row["error"] is None]
        images = [frames[i]["pixels"] for i in ok]
        probs, cams = self._infer(images) if ok else (np.zeros((0, len(self.class_names))), None)
        now = dt.datetime.now(dt.UTC)
        cols = {f.name: [None] * n for f in LABEL_SCHEMA}
        for key in _PASSED_THROUGH:
            cols[key] = [row[key] for row in frames]
        cols["model_version"] = [self.version] * n
        cols["run_id"] = [self.run_id] * n
        cols["labelled_at"] = [now] * n
        for j, i in enumerate(ok):
            order = np.argsort(-probs[j])
            cols["label"][i] = self.class_names[order[0]]
            cols["label_index"][i] = int(order[0])
            cols["confidence"][i] = float(probs[j, order[0]])
            cols["top2_label"][i] = self.class_names[order[1]] if len(order) > 1 else None
            cols["top2_confidence"][i] = float(probs[j, order[1]]) if len(order) > 1 else None
            cols["probabilities"][i] = probs[j].astype(np.float32).tolist()
        if cams is not None:  # cv2 drops the GIL: thumbnails are drawn on the decode threads
            pngs = draw_cams(self.pool, cams, [frames[i] for i in ok], self.size)
            for i, png in zip(ok, pngs, strict=True):
                if isinstance(png, str):
                    _unlabel(cols, i, png)
                else:
                    cols["gradcam_png"][i] = png
        return pa.table(cols, schema=LABEL_SCHEMA)


def draw_cams(pool: ThreadPoolExecutor, cams: list[np.ndarray], rows: list[dict], size: int) -> list[bytes | str]:
    """Each frame row's CAM thumbnail (PNG bytes), or its ``"malformed: ..."`` error if drawing failed."""
    def overlay(cam: np.ndarray, row: dict) -> bytes | str:
        try:
            return cam_thumbnail(cam, row["thumb"], row["width"], row["height"], size)
        except MemoryError:
            return error_text("too_large", "CAM overlay ran out of memory")
        except Exception as e:  # this frame's failure: an error row, not a dead batch
            return error_text("malformed", f"CAM overlay: {type(e).__name__}")

    return list(pool.map(overlay, cams, rows))


_LABEL_COLUMNS = ("label", "label_index", "confidence", "top2_label", "top2_confidence", "probabilities",
                  "gradcam_png")


def _unlabel(cols: dict[str, list], i: int, error: str) -> None:
    """Turn row ``i`` into an error row: no label without the CAM that was asked for."""
    for name in _LABEL_COLUMNS:
        cols[name][i] = None
    cols["error"][i] = error


def _optional_column(batch: dict[str, np.ndarray], name: str, n: int, cast) -> list:
    """A batch column as Python values (nulls as None), or all None when the batch lacks it."""
    if name not in batch:
        return [None] * n
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else cast(v) for v in batch[name]]
