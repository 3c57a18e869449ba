"""Issue 11's "done when": one labelling run over an archive that mixes good objects with every
failure class commits, with exactly one row set per object.

The per-object path is fuzzed in test_fuzz.py, size bombs in test_bombs.py, concurrent commits
in test_runs.py and test_label.py; here the real pipeline (Ray Data, the actors, the commit) runs
over all of them at once, on S3 (odd key names) and on local disk (symlinks, non-UTF-8 names).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as pads
import pytest

from fpc_ray.label.pipeline import LabelOptions, run_labelling
from fpc_ray.label.schema import ERROR_KINDS, error_kind
from fpc_ray.label.uids import valid_uid
from fpc_ray.storage import resolve
from tests import fixtures_archive as fx

pytestmark = [pytest.mark.ray, pytest.mark.s3]

GRAY = (np.add.outer(np.arange(96), np.arange(128)) % 256).astype(np.uint8)
FRAMES = [np.roll(GRAY, k, axis=1) for k in range(4)]
CAP = 4 * 1024**2  # --max-object-size for the run: the oversized object need not be gigabytes


@pytest.fixture(scope="module")
def model(trained_bundle, ray_local):
    """The session's trained bundle: what it predicts does not matter here, only that it runs."""
    return trained_bundle["bundle"]


def _hostile_objects() -> dict[str, tuple[bytes, str | int]]:
    """key -> (bytes, the error kind its row must carry, or the number of labelled frames)."""
    return {
        # Good objects, some under keys that URL parsing would cut short.
        "good/plain.png": (fx.png(GRAY), 1),
        "good/frag#ment.png": (fx.png(GRAY), 1),
        "good/query?x=1.jpg": (fx.jpeg(GRAY), 1),
        "good/with space 100%.png": (fx.png(GRAY), 1),
        "good/échographie-胎儿.dcm": (fx.dicom_mono(GRAY), 1),
        "good/cine.dcm": (fx.dicom_jpeg_ybr_cine(FRAMES), 4),
        # Every per-object failure class.
        "bad/empty.png": (b"", "empty"),
        "bad/notes.txt": (b"not an image", "not_an_image"),
        "bad/scan.tif": (fx.raster(GRAY, "TIFF"), "not_an_image"),
        "bad/cut.png": (fx.png(GRAY)[:80], "truncated"),
        "bad/nopixels.dcm": (fx.dicom_without_pixels(), "no_pixels"),
        "bad/clip.dcm": (fx.dicom_mpeg2_video(), "unsupported"),
        "bad/nested.dcm": (fx.dicom_nested_sequences(), "malformed"),
        "bad/odd.dcm": (fx.dicom_odd_length_rows(GRAY), "malformed"),
        "bad/vr.dcm": (fx.dicom_unknown_vr(GRAY), "malformed"),
        "bad/palette.dcm": (fx.dicom_palette_without_lut(GRAY), "malformed"),
        "bomb/ihdr.png": (fx.png_bomb(), "too_large"),
        "bomb/sof.jpg": (fx.jpeg_claiming(65000, 65000), "too_large"),
        "bomb/codestream.dcm": (fx.dicom_codestream_claiming("j2k", 30000, 30000), "too_large"),
        "bomb/dimensions.dcm": (fx.dicom_huge_dimensions(), "too_large"),
        "bomb/oversized.png": (fx.png(GRAY) + b"\0" * (CAP + 1), "too_large"),
        # More frames than NumberOfFrames says: the declared frames are labelled.
        "odd/excess-native.dcm": (fx.dicom_excess_frames(FRAMES, declared=2), 2),
        "odd/excess-jpeg.dcm": (fx.dicom_excess_frames(FRAMES, declared=2, jpeg=True), 2),
        "odd/uid-holds-a-name.dcm": (fx.dicom_uid_holding(GRAY, "StudyInstanceUID", "Doe^Jane"), 1),
    }


def _committed(output: str, run_id: str) -> list[dict]:
    loc = resolve(f"{output}/run={run_id}")
    return pads.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table().to_pylist()


def _check_one_row_set_per_object(rows: list[dict], expected: dict[str, str | int]) -> None:
    by_uri: dict[str, list[dict]] = {}
    for row in rows:
        by_uri.setdefault(row["source_uri"], []).append(row)
    assert sorted(by_uri) == sorted(expected), set(by_uri) ^ set(expected)
    for uri, want in expected.items():
        got = by_uri[uri]
        if isinstance(want, int):
            assert [r["error"] for r in got] == [None] * want, (uri, got[0]["error"])
            assert sorted(r["frame"] for r in got) == list(range(want)), uri
            assert all(r["label"] and r["gradcam_png"] for r in got), uri
        else:
            (row,) = got
            assert error_kind(row["error"]) == want and row["label"] is None, (uri, row["error"])
        for r in got:
            assert all(r[k] is None or valid_uid(r[k]) for k in ("study_uid", "series_uid", "sop_uid")), r


def test_a_hostile_s3_archive_commits_one_row_set_per_object(model, s3_server):
    client = s3_server.client()
    objects = _hostile_objects()
    for key, (body, _) in objects.items():
        client.put_object(Bucket="test", Key=f"hostile/{key}", Body=body)
    expected = {f"s3://test/hostile/{key}": want for key, (_, want) in objects.items()}

    opts = LabelOptions(run_id="hostile", max_object_bytes=CAP, max_error_rate=0.9, batch_size=8)
    summary = run_labelling(model, "s3://test/hostile/", "s3://test/hostile-labels", opts)

    rows = _committed("s3://test/hostile-labels", "hostile")
    _check_one_row_set_per_object(rows, expected)
    kinds = {w for w in expected.values() if isinstance(w, str)}
    assert summary["errors_by_kind"] == {k: sum(w == k for w in expected.values()) for k in kinds}
    # Every kind an object's bytes can earn; the rest are the listing's and the storage's (test_fuzz.py).
    assert set(summary["errors_by_kind"]) == set(ERROR_KINDS) - {"vanished", "unreadable", "bad_name"}
    assert "Doe^Jane" not in repr(rows)
    # Incremental: nothing is left to label, whatever the objects held.
    again = run_labelling(model, "s3://test/hostile/", "s3://test/hostile-labels", LabelOptions(run_id="again"))
    assert again["objects"]["labelled"] == 0


def test_a_hostile_local_archive_stays_inside_its_prefix(model, tmp_path):
    archive, outside = tmp_path / "archive", tmp_path / "outside"
    (archive / "study").mkdir(parents=True)
    outside.mkdir()
    (archive / "study" / "frame.png").write_bytes(fx.png(GRAY))
    (outside / "secret.png").write_bytes(fx.png(GRAY))
    os.symlink(archive, archive / "study" / "loop")            # a symlink loop
    os.symlink(outside, archive / "escape")                     # a folder outside the prefix
    os.symlink(outside / "secret.png", archive / "link.png")    # a file outside the prefix
    bad_name = os.fsencode(str(archive)) + b"/caf\xe9.png"      # Latin-1, not UTF-8
    with open(bad_name, "wb") as f:
        f.write(fx.png(GRAY))

    summary = run_labelling(model, str(archive), str(tmp_path / "labels"), LabelOptions(run_id="local"))

    rows = _committed(str(tmp_path / "labels"), "local")
    printable = f"{archive}/caf\\xe9.png"
    _check_one_row_set_per_object(rows, {f"{archive}/study/frame.png": 1, printable: "bad_name"})
    assert summary["objects"]["labelled"] == 2
