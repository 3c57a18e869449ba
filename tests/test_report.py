"""fpc-ray report: self-contained pages for a bundle and a labelling run, rendered by headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.phantom import phantom_bundle

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,2400"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here when missing (the test set-up the README's command relies on)."""
    found = shutil.which("chromium")
    if found is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                              capture_output=True, text=True, env=env, timeout=1200)
        assert done.returncode == 0, f"could not install chromium: {done.stderr[-1500:]}"
        found = shutil.which("chromium")
    assert found, "chromium is not on PATH"
    return found


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A trained phantom bundle and a committed labelling run over a folder with a broken file."""
    from fpc_ray.label.pipeline import LabelOptions, run_labelling

    root = tmp_path_factory.mktemp("report")
    phantom_bundle(root, seed=8, epochs=2)
    archive = root / "archive"
    archive.mkdir()
    for image in sorted((root / "data" / "Images").glob("*.png"))[:30]:
        shutil.copy(image, archive / image.name)
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (archive / "notes.txt").write_text("not an image")
    import ray

    run_labelling(str(root / "bundle"), str(archive), str(root / "labels"), LabelOptions(run_id="r1"),
                  echo=lambda s: None)
    ray.shutdown()  # the in-process cluster run_labelling started; later modules start their own
    return root


def _report(target: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "fpc_ray", "report", str(target), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text()


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _assert_self_contained(page: str) -> None:
    # Nothing the browser would fetch: no src/href/url() outside data URIs, no scripts, no imports.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "url(" not in page and "<script" not in page and "@import" not in page and "<link" not in page


def _render(chromium: str, page: Path, tmp_path: Path) -> Path:
    shot = tmp_path / (page.stem + ".png")
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    return shot


@pytest.mark.ray
def test_model_report_embeds_its_pictures_and_renders(labelled, chromium, tmp_path):
    page = _report(labelled / "bundle", tmp_path / "model.html")
    _assert_self_contained(page)
    for title in ("Training curves", "Confusion matrix", "Per-class precision, recall and F1", "Calibration",
                  "Model card"):
        assert title in page, title
    pngs = _embedded_pngs(page)
    assert len(pngs) >= 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "4,364,650" in page  # parameter count from the card
    _render(chromium, tmp_path / "model.html", tmp_path)


@pytest.mark.ray
def test_run_report_embeds_galleries_and_errors_and_renders(labelled, chromium, tmp_path):
    page = _report(labelled / "labels" / "run=r1", tmp_path / "run.html")
    _assert_self_contained(page)
    for title in ("Frames by class", "Confidence", "Studies", "Least confident frames", "A sample per class",
                  "Errors (2)", "not_an_image", "broken.png", "notes.txt", "label_s"):
        assert title in page, title
    pngs = _embedded_pngs(page)
    assert len(pngs) >= 3 + 24 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    shot = _render(chromium, tmp_path / "run.html", tmp_path)
    from PIL import Image

    with Image.open(shot) as im:  # a real page was painted, not a blank one
        assert im.size == (1280, 2400) and len(set(im.convert("L").resize((64, 120)).getdata())) > 20


def test_report_of_neither_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fpc_ray", "report", str(tmp_path), "--output",
                           str(tmp_path / "x.html")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a model bundle" in done.stderr
    assert not (tmp_path / "x.html").exists()
