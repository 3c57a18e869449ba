"""Reading and decoding one listed object into its frame rows, on whichever process runs it.

:class:`ReadDecode` is the per-object step of both labelling designs: the one-stage predictor
actors run it on threads, the GPU design's CPU stage runs it in Ray Data tasks. Every failure that
belongs to the object becomes its error row here, so both designs report the same rows.
"""

from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np

from fpc_ray.data.transforms import letterbox, letterbox_box
from fpc_ray.errors import private_reason
from fpc_ray.label.decode import Codestream, DecodeError, decode_object
from fpc_ray.label.schema import error_kind, error_text

DEFAULT_MAX_OBJECT_BYTES = 2 * 1024**3  # generous for cine loops; a bigger object is an error row
_READ_CHUNK = 64 * 1024**2
# The object is no longer there to read: deleted, or replaced by a folder, after the listing.
_VANISHED = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def error_row(uri: str, error: str, sha256: str | None = None) -> dict:
    """The one row of an object that yields no frames: ``error`` is ``"kind: detail"``."""
    return {"source_uri": uri, "content_sha256": sha256, "study_uid": None, "series_uid": None,
            "sop_uid": None, "frame": 0, "width": None, "height": None, "error": error,
            "input_kind": None, "pixels": None, "thumb": None, "jpeg": None}


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
                 max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES, uid_key: str | None = None,
                 keep_jpeg: bool = False):
        from fpc_ray.config import StorageConfig

        self.storage = StorageConfig.model_validate(storage or {})
        self.input_size = input_size
        self.thumb_size = thumb_size
        self.frame_stride = frame_stride
        self.max_object_bytes = max_object_bytes
        self.uid_key = uid_key
        self.keep_jpeg = keep_jpeg  # JPEG frames a batched decoder takes stay encoded (see decode_object)
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
        decoded = decode_object(uri, data, self.frame_stride, self.uid_key, self.keep_jpeg)
        base = {"source_uri": uri, "content_sha256": sha256, "input_kind": decoded.kind, **decoded.uids}
        rows = []
        for index, frame in decoded.frames:
            if isinstance(frame, Codestream):  # decoded, letterboxed and thumbnailed by the predictor
                rows.append({**base, "frame": index, "width": frame.width, "height": frame.height, "error": None,
                             "pixels": None, "thumb": None, "jpeg": frame.data})
                continue
            h, w = frame.shape
            rows.append({**base, "frame": index, "width": w, "height": h, "error": None,
                         "pixels": letterbox(frame, self.input_size), "thumb": thumbnail(frame, self.thumb_size),
                         "jpeg": None})
        return rows


def thumbnail(gray: np.ndarray, thumb_size: int) -> np.ndarray:
    """The frame shrunk to its thumbnail: its aspect, the long side ``thumb_size``."""
    h, w = gray.shape
    _, _, th, tw = letterbox_box(h, w, thumb_size)
    return cv2.resize(gray, (tw, th), interpolation=cv2.INTER_AREA)
