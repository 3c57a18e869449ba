"""From classified frames to :data:`LABEL_SCHEMA` rows: labels, probabilities and CAM thumbnails.

Both labelling designs build their rows here: the one-stage predictor actors after inference, the
GPU design in the CPU stage after the GPU predictors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from concurrent.futures import Executor

import cv2
import numpy as np
import pyarrow as pa

from fpc_ray.data.transforms import letterbox_box
from fpc_ray.label.schema import LABEL_SCHEMA, error_text

# The columns a frame row carries from reading and decoding to the output. `input_kind` is written
# where LABEL_SCHEMA has the column and dropped where it has not (see label_table).
PASSED_THROUGH = ("source_uri", "frame", "study_uid", "series_uid", "sop_uid", "width", "height",
                  "content_sha256", "error", "input_kind")
_LABEL_COLUMNS = ("label", "label_index", "confidence", "top2_label", "top2_confidence", "probabilities",
                  "gradcam_png")


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


def draw_cams(pool: Executor | None, cams: Sequence[np.ndarray], rows: list[dict], size: int) -> list[bytes | str]:
    """Each frame row's CAM thumbnail (PNG bytes), or its ``"malformed: ..."`` error if drawing failed.

    On ``pool``'s threads (cv2 drops the GIL), or in this thread where there is none.
    """
    def overlay(cam: np.ndarray, row: dict) -> bytes | str:
        try:
            return cam_thumbnail(cam, row["thumb"], row["width"], row["height"], size)
        except MemoryError:
            return error_text("too_large", "CAM overlay ran out of memory")
        except Exception as e:  # this frame's failure: an error row, not a dead batch
            return error_text("malformed", f"CAM overlay: {type(e).__name__}")

    return list((pool.map if pool is not None else map)(overlay, cams, rows))


def label_table(passed: dict[str, list], ok: list[int], probs: np.ndarray, pngs: list[bytes | str] | None,
                class_names: list[str], version: str, run_id: str) -> pa.Table:
    """The LABEL_SCHEMA table of a batch of frame rows.

    Args:
        passed: the :data:`PASSED_THROUGH` columns of every row (error rows included).
        ok: the rows that were classified, in the order of ``probs`` and ``pngs``.
        probs: their probabilities (len(ok) x classes).
        pngs: their CAM thumbnails (or a frame's overlay error, which turns it into an error row);
            None when no CAM was asked for.
    """
    n = len(passed["source_uri"])
    now = dt.datetime.now(dt.UTC)
    # Built from the schema's fields: a passed column the schema lacks is dropped here.
    cols = {f.name: list(passed[f.name]) if f.name in passed else [None] * n for f in LABEL_SCHEMA}
    cols["model_version"] = [version] * n
    cols["run_id"] = [run_id] * n
    cols["labelled_at"] = [now] * n
    for j, i in enumerate(ok):
        order = np.argsort(-probs[j])
        cols["label"][i] = class_names[order[0]]
        cols["label_index"][i] = int(order[0])
        cols["confidence"][i] = float(probs[j, order[0]])
        cols["top2_label"][i] = class_names[order[1]] if len(order) > 1 else None
        cols["top2_confidence"][i] = float(probs[j, order[1]]) if len(order) > 1 else None
        cols["probabilities"][i] = probs[j].astype(np.float32).tolist()
    for i, png in zip(ok, pngs, strict=True) if pngs is not None else ():
        if isinstance(png, str):
            _unlabel(cols, i, png)
        else:
            cols["gradcam_png"][i] = png
    return pa.table(cols, schema=LABEL_SCHEMA)


def _unlabel(cols: dict[str, list], i: int, error: str) -> None:
    """Turn row ``i`` into an error row: no label without the CAM that was asked for."""
    for name in _LABEL_COLUMNS:
        cols[name][i] = None
    cols["error"][i] = error


def optional_column(batch: dict[str, np.ndarray], name: str, n: int, cast) -> list:
    """A batch column as Python values (nulls as None), or all None when the batch lacks it."""
    if name not in batch:
        return [None] * n
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else cast(v) for v in batch[name]]
