"""One odd object must never stop a run: mutated and hostile objects through the per-object path.

Every object goes through :meth:`ReadDecode.frames` from a local file, on a thread pool as in the
labelling actor, and must end as rows (error rows with a declared kind, or frames with sane
pixels) within a time bound; nothing may raise.
"""

from __future__ import annotations

import os
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fpc_ray.label.predictor import ReadDecode, draw_cams, printable_name
from fpc_ray.label.schema import ERROR_KINDS, error_kind
from tests import fixtures_archive as fx

GRAY = (np.add.outer(np.arange(48), np.arange(64)) * 2 % 256).astype(np.uint8)
FRAMES = [np.roll(GRAY, k, axis=1) for k in range(4)]
INPUT, THUMB = 64, 32
SECONDS_PER_OBJECT = 10.0  # generous: each takes milliseconds; a hang or a huge allocation does not
MUTANTS_PER_SEED = 25


def _seeds() -> dict[str, bytes]:
    """A valid object of every supported kind."""
    rgb = np.stack([GRAY, np.flipud(GRAY), 255 - GRAY], axis=-1)
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 200, np.uint8)], axis=-1)
    return {
        "gray8.png": fx.png(GRAY), "gray16.png": fx.png(GRAY.astype(np.uint16) * 257),
        "rgb.png": fx.png(rgb), "rgba.png": fx.png(rgba), "palette.png": fx.png(GRAY, mode="P"),
        "photo.jpg": fx.jpeg(GRAY), "mono.dcm": fx.dicom_mono(GRAY), "be16.dcm": fx.dicom_big_endian_16bit(GRAY),
        "rgbcine.dcm": fx.dicom_rgb_multiframe(FRAMES), "ybrcine.dcm": fx.dicom_jpeg_ybr_cine(FRAMES),
        "rle.dcm": fx.dicom_rle(GRAY), "j2k.dcm": fx.dicom_j2k(GRAY), "palette.dcm": fx.dicom_palette(GRAY),
        "deflated.dcm": fx.dicom_deflated(GRAY),
        "windowed.dcm": fx.dicom_windowed(GRAY.astype(np.uint16) * 16, center=1000, width=500),
        "voilut.dcm": fx.dicom_windowed(GRAY.astype(np.uint16) * 16, voi_lut=(0, np.arange(4096, dtype=np.uint16))),
    }


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of length fields: PNG chunks, JPEG segments, DICOM long VRs and items."""
    found = []
    if data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 8 <= len(data):
            found.append((pos, 4))
            pos += 12 + struct.unpack(">I", data[pos:pos + 4])[0]
    for i in range(len(data) - 3):
        if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE and data[i + 1] not in (0xD8, 0xD9):
            found.append((i + 2, 2))  # a JPEG segment length (or a J2K marker's)
    for marker in (b"OB\0\0", b"OW\0\0", b"SQ\0\0", b"UN\0\0", b"UT\0\0", b"\xfe\xff\x00\xe0"):
        start = 0
        while (i := data.find(marker, start)) >= 0:
            found.append((i + 4, 4))
            start = i + 1
    return found


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random mutations: flips, deletions, duplications, lengths, truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        how = rng.choice(["flip", "delete", "duplicate", "length", "length", "truncate"])
        n = len(out)
        if n < 8:
            break
        i = rng.randrange(n)
        span = rng.randint(1, max(1, n // 20))
        if how == "flip":
            for j in rng.sample(range(n), k=min(n, rng.randint(1, 8))):
                out[j] ^= 1 << rng.randrange(8)
        elif how == "delete":
            del out[i:i + span]
        elif how == "duplicate":
            out[i:i] = out[i:i + span]
        elif how == "truncate":
            del out[rng.randrange(1, n):]
        else:
            fields = _length_fields(bytes(out))
            if fields:
                pos, width = rng.choice(fields)
                out[pos:pos + width] = rng.choice([b"\xff", b"\x00"]) * width
    return bytes(out)


def _check_rows(uri: str, rows: list[dict]) -> None:
    assert rows, uri
    for row in rows:
        assert row["source_uri"] == uri
        if row["error"] is not None:
            kind = error_kind(row["error"])
            assert row["error"].startswith(f"{kind}: ") and kind in ERROR_KINDS and "\n" not in row["error"], row
            assert row["pixels"] is None and row["width"] is None
            continue
        assert row["width"] > 0 and row["height"] > 0
        assert row["pixels"].dtype == np.uint8 and row["pixels"].shape == (INPUT, INPUT)
        assert row["thumb"].dtype == np.uint8 and row["thumb"].ndim == 2
        assert max(row["thumb"].shape) == THUMB


def _through_actor_path(reader: ReadDecode, objects: list[tuple[str, int | None, str | None]]):
    """Each object through ``reader.frames`` on two threads, as the labelling actor runs it."""
    def timed(obj):
        start = time.monotonic()
        rows = reader.frames(*obj)
        return rows, time.monotonic() - start

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(timed, objects))


def test_mutated_objects_of_every_kind_end_as_rows(tmp_path):
    rng = random.Random(11)
    objects = []
    for name, data in _seeds().items():
        for k in range(MUTANTS_PER_SEED):
            path = tmp_path / f"{k:03d}-{name}"
            path.write_bytes(_mutate(data, rng))
            objects.append((str(path), path.stat().st_size, None))
    reader = ReadDecode(None, INPUT, THUMB, frame_stride=1)
    kinds = []
    for (uri, _, _), (rows, seconds) in zip(objects, _through_actor_path(reader, objects), strict=True):
        _check_rows(uri, rows)
        assert seconds < SECONDS_PER_OBJECT, (uri, seconds)
        kinds += [error_kind(row["error"]) if row["error"] else "ok" for row in rows]
        # The DICOM seeds carry a patient's identifiers: a mutant's error or UIDs never quote them.
        text = repr([{k: row[k] for k in ("error", "study_uid", "series_uid", "sop_uid")} for row in rows])
        assert not any(v in text or v.replace("^", " ") in text for v in fx.PATIENT.values()), (uri, text)
    assert len(objects) >= 300 and "ok" in kinds and len(set(kinds)) >= 3  # the mutations bite


def test_named_failures_end_as_error_rows(tmp_path):
    """Each of these stopped a run before; each is now exactly its object's error rows."""
    cases = {
        "nested.dcm": (fx.dicom_nested_sequences(), "malformed"),
        "odd.dcm": (fx.dicom_odd_length_rows(GRAY), "malformed"),
        "vr.dcm": (fx.dicom_unknown_vr(GRAY), "malformed"),
        "palette.dcm": (fx.dicom_palette_without_lut(GRAY), "malformed"),
        "codestream.dcm": (fx.dicom_codestream_claiming("jpeg", 30000, 30000), "too_large"),
        "scan.tif": (fx.raster(GRAY, "TIFF"), "not_an_image"),
        "empty.png": (b"", "empty"),
        "cut.png": (fx.png(GRAY)[:60], "truncated"),
        "nopixels.dcm": (fx.dicom_without_pixels(), "no_pixels"),
        "clip.dcm": (fx.dicom_mpeg2_video(), "unsupported"),
    }
    objects = []
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
        objects.append((str(tmp_path / name), len(data), None))
    gone = tmp_path / "gone.png"  # listed, then deleted before the actor read it
    gone.write_bytes(fx.png(GRAY))
    objects.append((str(gone), gone.stat().st_size, None))
    gone.unlink()
    # A local name that is not UTF-8: the listing cannot put it in a string column, so it passes
    # the object's error instead, and the object is not read.
    bad = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write(fx.png(GRAY))
    objects.append((os.fsdecode(bad), 0, "bad_name: the file name is not valid UTF-8"))
    objects.append((os.fsdecode(bad), 0, None))  # even where the lister forgot to say so
    stale = tmp_path / "grew.dcm"  # bigger than the listing said and than the cap
    stale.write_bytes(fx.dicom_mono(np.zeros((400, 400), np.uint8)))
    objects.append((str(stale), 100, None))
    objects.append((str(tmp_path / "big.dcm"), 200_000, None))  # over the cap by the listing: never read
    # The storage refuses this one object (as root, permissions cannot be used to show it; a name
    # over the filesystem's limit is refused the same way): its row, not a failed run.
    objects.append((str(tmp_path / ("x" * 300 + ".png")), 10, None))

    reader = ReadDecode(None, INPUT, THUMB, frame_stride=1, max_object_bytes=100_000)
    results = _through_actor_path(reader, objects)
    got = {}
    for (uri, _, listed), (rows, _) in zip(objects, results, strict=True):
        name = printable_name(uri)  # what a row can hold: a UTF-8 string
        _check_rows(name, rows)
        assert len(rows) == 1 and rows[0]["error"], uri
        got[os.path.basename(name) + ("" if listed or name == uri else " (unlisted)")] = error_kind(rows[0]["error"])
        assert "xxxx" not in rows[0]["error"], rows[0]["error"]  # a storage refusal never quotes the name
    expected = {name: kind for name, (_, kind) in cases.items()}
    expected |= {"x" * 300 + ".png": "unreadable",
                 "gone.png": "vanished", "caf\\xe9.png": "bad_name", "caf\\xe9.png (unlisted)": "bad_name",
                 "grew.dcm": "too_large", "big.dcm": "too_large"}
    assert got == expected
    # every declared kind is produced by some object here, and nothing else is
    assert set(got.values()) == set(ERROR_KINDS)


def test_a_frame_whose_cam_overlay_fails_is_an_error_row():
    thumb = np.zeros((24, 32), np.uint8)
    rows = [{"thumb": thumb, "width": 64, "height": 48}] * 2
    cams = [np.random.default_rng(0).random((7, 7)), np.zeros((0, 0))]  # the second cannot be resized
    with ThreadPoolExecutor(max_workers=2) as pool:
        good, bad = draw_cams(pool, cams, rows, INPUT)
    assert isinstance(good, bytes) and good.startswith(b"\x89PNG")
    assert isinstance(bad, str) and bad.startswith("malformed: CAM overlay")


@pytest.mark.parametrize("listing_error", ["read_failed: a kind nobody declared", "no kind at all"])
def test_listing_errors_must_name_a_declared_kind(listing_error):
    with pytest.raises(ValueError):
        ReadDecode(None, INPUT, THUMB, 1).frames("x.png", 1, listing_error)


@pytest.mark.s3
def test_s3_object_deleted_after_listing_is_vanished(s3_server):
    client = s3_server.client()
    client.put_object(Bucket="test", Key="fuzz/gone.png", Body=fx.png(GRAY))
    reader = ReadDecode(None, INPUT, THUMB, 1)
    assert reader.frames("s3://test/fuzz/gone.png", 10)[0]["error"] is None  # stale size: read anyway
    client.delete_object(Bucket="test", Key="fuzz/gone.png")
    rows = reader.frames("s3://test/fuzz/gone.png", 10)
    assert len(rows) == 1 and rows[0]["error"].startswith("vanished: ")
    # A key pyarrow cannot address (an empty path component) is that object's row, not a dead batch.
    client.put_object(Bucket="test", Key="fuzz/a//b.png", Body=fx.png(GRAY))
    rows = reader.frames("s3://test/fuzz/a//b.png", 10)
    assert len(rows) == 1 and rows[0]["error"].startswith("bad_name: "), rows[0]["error"]
