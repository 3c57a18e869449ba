"""Size bombs: whatever an archive holds, one object cannot blow up a labelling actor's memory.

Each bomb goes through the real per-object path (:meth:`ReadDecode.frames` on a local file) in
a fresh interpreter, which reports its peak RSS before and after; the growth must stay small
and the object must end as exactly one ``too_large`` row. Before this test existed, a 2 GiB
object raised an actor's memory by 4.1 GB and a 3 MB DICOM whose header said 64x64 by ~1 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import fixtures_archive as fx

# Every test here measures a fresh interpreter's memory in a subprocess (a few seconds each).
pytestmark = pytest.mark.slow

MAX_GROWTH_MB = 300
GRAY = np.zeros((64, 64), np.uint8)

# Runs in the child: warm up every decoder on small valid objects (imports, plugin discovery,
# first allocations), then read the peak RSS around the bomb alone.
PROBE = """
import json, resource, sys
from fpc_ray.label.predictor import ReadDecode

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

warmups, bomb, size, cap = json.loads(sys.argv[1])
reader = ReadDecode(None, 224, 128, 1, **({"max_object_bytes": cap} if cap else {}))
for path in warmups:
    assert reader.frames(path, None)[0]["error"] is None, path
before = peak_mb()
rows = reader.frames(bomb, size)
print(json.dumps({"errors": [row["error"] for row in rows], "growth_mb": peak_mb() - before}))
"""


def _sparse(path, size: int) -> None:
    """A file of ``size`` bytes that occupies no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def warmups(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("warmups")
    objects = {"a.png": fx.png(GRAY), "a.jpg": fx.jpeg(GRAY), "a.dcm": fx.dicom_mono(GRAY),
               "j2k.dcm": fx.dicom_j2k(GRAY), "jpeg.dcm": fx.dicom_codestream_claiming("jpeg", 64, 64)}
    for name, data in objects.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in objects]


BOMBS = {
    "png_ihdr_100000x100000": lambda: fx.png_bomb(),
    "jpeg_sof_65000x65000": lambda: fx.jpeg_claiming(65000, 65000),
    "dicom_64x64_jpeg_says_30000x30000": lambda: fx.dicom_codestream_claiming("jpeg", 30000, 30000),
    "dicom_64x64_j2k_says_30000x30000": lambda: fx.dicom_codestream_claiming("j2k", 30000, 30000),
    "dicom_rows_cols_frames_huge": fx.dicom_huge_dimensions,
    "dicom_deflated_400MB_of_zeros": lambda: fx.dicom_deflated(GRAY, 400 * 1024**2),
}


def _probe(warmups: list[str], bomb: str, size: int | None, cap: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([warmups, bomb, size, cap])],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_one_too_large_row(result: dict) -> None:
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("too_large: "), result
    assert result["growth_mb"] < MAX_GROWTH_MB, result


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_stay_small(name, warmups, tmp_path):
    path = tmp_path / name
    path.write_bytes(BOMBS[name]())
    _assert_one_too_large_row(_probe(warmups, str(path), path.stat().st_size))


def test_object_over_the_default_cap_is_not_read(warmups, tmp_path):
    path = tmp_path / "cine.dcm"
    _sparse(path, 3 * 1024**3)
    _assert_one_too_large_row(_probe(warmups, str(path), 3 * 1024**3))


def test_stale_listing_size_reads_at_most_the_cap(warmups, tmp_path):
    """The listing said 100 bytes; the object has since grown to 3 GiB: read cap + 1 bytes, no more."""
    path = tmp_path / "grown.dcm"
    _sparse(path, 3 * 1024**3)
    _assert_one_too_large_row(_probe(warmups, str(path), 100, cap=64 * 1024**2))


def test_dense_png_at_the_pixel_limit_decodes_within_bounds(warmups, tmp_path):
    """Legitimately big dimensions and a tiny zlib stream: decoded, and memory stays bounded."""
    path = tmp_path / "dense.png"
    path.write_bytes(fx.png(np.zeros((6000, 6000), np.uint8)))
    result = _probe(warmups, str(path), path.stat().st_size)
    assert result["errors"] == [None] and result["growth_mb"] < MAX_GROWTH_MB, result
