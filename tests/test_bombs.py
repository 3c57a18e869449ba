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

# One subprocess measures them all (a few seconds): a fresh interpreter warms up every decoder on
# small valid objects (imports, plugin discovery, first allocations), then forks a child per bomb,
# so each bomb's peak RSS is measured alone, from the warm state, in a process of its own.
pytestmark = pytest.mark.slow

MAX_GROWTH_MB = 300
GRAY = np.zeros((64, 64), np.uint8)

PROBE = """
import json, os, resource, sys
import cv2
cv2.setNumThreads(1)  # no OpenCV thread pool in the parent: its threads would not survive fork()
from fpc_ray.label.predictor import ReadDecode

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

warmups, jobs = json.loads(sys.argv[1])
reader = ReadDecode(None, 224, 128, 1)
for path in warmups:
    assert reader.frames(path, None)[0]["error"] is None, path
results = {}
for name, (bomb, size, cap) in jobs.items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh peak RSS counter, the parent's warm state
        os.close(read)
        before = peak_mb()
        child = ReadDecode(None, 224, 128, 1, **({"max_object_bytes": cap} if cap else {}))
        rows = child.frames(bomb, size)
        result = {"errors": [row["error"] for row in rows], "growth_mb": peak_mb() - before}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(out) if out else {"errors": ["child died"], "status": status}
print(json.dumps(results))
"""


def _sparse(path, size: int) -> None:
    """A file of ``size`` bytes that occupies no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)


def _warmups(folder) -> list[str]:
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


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    """Every object below read through the per-object path, each in a forked child: name -> its
    rows' errors and its peak-RSS growth in MB."""
    folder = tmp_path_factory.mktemp("bombs")
    jobs = {}
    for name, make in BOMBS.items():
        (folder / name).write_bytes(make())
        jobs[name] = (str(folder / name), (folder / name).stat().st_size, None)
    _sparse(folder / "cine.dcm", 3 * 1024**3)  # over the default cap by its listed size
    jobs["over_the_default_cap"] = (str(folder / "cine.dcm"), 3 * 1024**3, None)
    # The listing said 100 bytes; the object has since grown to 3 GiB: read cap + 1 bytes, no more.
    jobs["stale_listing_size"] = (str(folder / "cine.dcm"), 100, 64 * 1024**2)
    # Legitimately big dimensions and a tiny zlib stream: decoded, and memory stays bounded.
    (folder / "dense.png").write_bytes(fx.png(np.zeros((6000, 6000), np.uint8)))
    jobs["dense_png"] = (str(folder / "dense.png"), (folder / "dense.png").stat().st_size, None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([_warmups(folder), jobs])],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_one_too_large_row(result: dict) -> None:
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("too_large: "), result
    assert result["growth_mb"] < MAX_GROWTH_MB, result


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_stay_small(name, measured):
    _assert_one_too_large_row(measured[name])


def test_object_over_the_default_cap_is_not_read(measured):
    _assert_one_too_large_row(measured["over_the_default_cap"])


def test_stale_listing_size_reads_at_most_the_cap(measured):
    """The listing said 100 bytes; the object has since grown to 3 GiB: read cap + 1 bytes, no more."""
    _assert_one_too_large_row(measured["stale_listing_size"])


def test_dense_png_at_the_pixel_limit_decodes_within_bounds(measured):
    """Legitimately big dimensions and a tiny zlib stream: decoded, and memory stays bounded."""
    result = measured["dense_png"]
    assert result["errors"] == [None] and result["growth_mb"] < MAX_GROWTH_MB, result
    assert result["growth_mb"] > 10, result  # the decode itself is measured: 36 MB of pixels at least
