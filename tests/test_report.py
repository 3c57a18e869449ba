"""fpc-ray report: self-contained pages for a bundle and a labelling run, rendered by headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fpc_ray.cli import app

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
def labelled(tmp_path_factory, trained_bundle, ray_cluster):
    """The session's trained phantom bundle and a committed labelling run over a folder with a
    broken file: ``{"bundle", "run"}`` paths."""
    from fpc_ray.label.pipeline import LabelOptions, run_labelling

    root = tmp_path_factory.mktemp("report")
    archive = root / "archive"
    archive.mkdir()
    for image in sorted((Path(trained_bundle["data"]) / "Images").glob("*.png"))[:30]:
        shutil.copy(image, archive / image.name)
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (archive / "notes.txt").write_text("not an image")
    run_labelling(trained_bundle["bundle"], str(archive), str(root / "labels"), LabelOptions(run_id="r1"),
                  echo=lambda s: None)
    return {"bundle": Path(trained_bundle["bundle"]), "run": root / "labels" / "run=r1"}


def _report(target: Path, out: Path) -> str:
    result = CliRunner().invoke(app, ["report", str(target), "--output", str(out)])
    assert result.exit_code == 0, result.output
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
    page = _report(labelled["bundle"], tmp_path / "model.html")
    _assert_self_contained(page)
    for title in ("Training curves", "Confusion matrix", "Per-class precision, recall and F1", "Calibration",
                  "Model card"):
        assert title in page, title
    pngs = _embedded_pngs(page)
    assert len(pngs) >= 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "4,364,650" in page  # parameter count from the card
    # The trained bundle is calibrated: the report says with what, before and after.
    assert "Probabilities are softmax(logits / T) with T = " in page and "test ECE before calibration" in page
    _render(chromium, tmp_path / "model.html", tmp_path)


@pytest.mark.ray
def test_run_report_embeds_galleries_and_errors_and_renders(labelled, chromium, tmp_path):
    page = _report(labelled["run"], tmp_path / "run.html")
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
    done = CliRunner().invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "x.html")])
    assert done.exit_code == 2 and done.output.count("\n") == 1 and "not a model bundle" in done.output
    assert not (tmp_path / "x.html").exists()


# ---------------------------------------------------------------- --no-source-uri-in-report
PATIENT = "DOE^JANE-MRN0417"  # what an archive's keys may carry
SOURCES = [f"s3://archive/2026/11/24/{PATIENT}/img-{i:03d}.png" for i in range(4)]
BROKEN = f"s3://archive/2026/11/24/{PATIENT}/study-7.dcm"


def _committed_run(folder: Path) -> Path:
    """A committed run written by hand in LABEL_SCHEMA: four labelled frames and one error row
    whose message quotes the object (as a storage error does, without the scheme)."""
    import datetime as dt
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from fpc_ray.label.runs import SUCCESS
    from fpc_ray.label.schema import LABEL_SCHEMA

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 140, 200)).save(buf, format="PNG")
    now = dt.datetime.now(dt.UTC)
    base = {name: None for name in LABEL_SCHEMA.names} | {"frame": 0, "run_id": "r9", "labelled_at": now,
                                                          "model_version": "v1"}
    rows = [base | {"source_uri": uri, "label": ("Fetal brain", "Other")[i % 2], "confidence": 0.4 + 0.1 * i,
                    "gradcam_png": buf.getvalue(), "study_uid": "1.2.3"} for i, uri in enumerate(SOURCES)]
    rows.append(base | {"source_uri": BROKEN,
                        "error": f"read_failed: cannot access {BROKEN.removeprefix('s3://')}: timed out"})
    run = folder / "run=r9"
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), run / "part-00000.parquet")
    summary = {"run_id": "r9", "model_version": "v1", "model_uri": "s3://models/b1",
               "input": f"s3://archive/2026/11/24/{PATIENT}/", "output": str(run),
               "objects": {"listed": 5, "skipped": 0, "labelled": 5}, "rows": 5, "labelled": 4, "errors": 1,
               "errors_by_kind": {"read_failed": 1}, "by_class": {"Fetal brain": 2, "Other": 2},
               "options": {"cam": "gradcam"}, "timings": {"total_s": 1.0}}
    (run / SUCCESS).write_text(json.dumps(summary))
    return run


@pytest.mark.parametrize("hide", [False, True])
def test_run_report_can_leave_out_every_source_uri(tmp_path, hide):
    run = _committed_run(tmp_path / "labels")
    out = tmp_path / "run.html"
    flags = ["--no-source-uri-in-report"] if hide else []
    result = CliRunner().invoke(app, ["report", str(run), "--output", str(out), *flags])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert ("Least confident frames" in page) and ("read_failed (1)" in page)
    if not hide:
        assert all(uri in page for uri in [*SOURCES, BROKEN]) and PATIENT in page
        return
    assert PATIENT not in page and "archive/2026" not in page
    assert page.count("object ") >= 2 * len(SOURCES) + 1  # galleries twice each, the error row once
    # One object keeps one pseudonym across the page: each labelled one shows in both galleries.
    names = re.findall(r"object [0-9a-f]{8}", page)
    assert len(set(names)) == len(SOURCES) + 1
    assert "prefix " in page and "cannot access object " in page


def test_model_report_can_leave_out_the_data_uri(tmp_path):
    import json

    from fpc_ray.config import StorageConfig
    from fpc_ray.report import build_report

    bundle = tmp_path / "b"
    bundle.mkdir()
    card = {"format": "fpc-ray-bundle/1", "version": "v1", "created_at": "2026-11-26T00:00:00+00:00",
            "versions": {"fpc_ray": "0"}, "class_names": ["a", "b"], "weights_sha256": "0" * 64,
            "architecture": {"backbone": "x", "attention": {}, "head": {}, "pretrained": "none"},
            "parameters": {"total": 1, "trainable": 1}, "input": {"size": 64, "resize": "letterbox"},
            "metrics": {"val": {"epoch": 1, "val_top1": 0.5, "val_top2": 1.0}, "test": None},
            "data": {"uri": f"s3://archive/{PATIENT}/", "fingerprint": "f" * 64},
            "training": {"epochs": 1, "num_workers": 0, "use_gpu": False, "wall_s": 1.0}}
    (bundle / "model.json").write_text(json.dumps(card))
    shown = build_report(str(bundle), StorageConfig())[1]
    hidden = build_report(str(bundle), StorageConfig(), hide_sources=True)[1]
    assert PATIENT in shown and PATIENT not in hidden and "f" * 64 in hidden


def test_model_report_shows_calibration_before_and_after_and_every_dataset(tmp_path):
    """A card with a temperature, two training datasets and a retrain's per-dataset scores (cheap:
    a hand-made card, no model)."""
    import json

    import numpy as np

    from fpc_ray.calibration import calibration_record
    from fpc_ray.config import StorageConfig
    from fpc_ray.report import build_report
    from fpc_ray.scoring import report_from_logits

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = (np.eye(2)[labels] * 0.8 + rng.normal(0, 0.5, (400, 2))).astype(np.float32)  # under-confident
    calibration = calibration_record(logits, labels)
    test = report_from_logits(logits, labels, ["a", "b"], calibration["temperature"])
    assert calibration["temperature"] < 1.0 and test["ece"] < test["ece_uncalibrated"]
    datasets = [{"uri": f"s3://data/{name}/", "fingerprint": c * 64, "splits": {"train": 5, "val": 2, "test": 3}}
                for name, c in ((PATIENT, "a"), ("reviewed-1", "b"))]
    scores = [{"uri": d["uri"], "n": 3, "top1": t, "top2": 1.0} for d, t in zip(datasets, (0.91, 0.42), strict=True)]
    card = {"format": "fpc-ray-bundle/1", "version": "v1", "created_at": "2026-11-26T00:00:00+00:00",
            "versions": {"fpc_ray": "0"}, "class_names": ["a", "b"], "weights_sha256": "0" * 64,
            "architecture": {"backbone": "x", "attention": {}, "head": {}, "pretrained": "none"},
            "parameters": {"total": 1, "trainable": 1}, "input": {"size": 64, "resize": "letterbox"},
            "metrics": {"val": {"epoch": 1, "val_top1": 0.5, "val_top2": 1.0}, "test": test},
            "calibration": calibration, "datasets": datasets,
            "data": {"uri": " + ".join(d["uri"] for d in datasets), "fingerprint": "f" * 64},
            "training": {"epochs": 1, "num_workers": 0, "use_gpu": False, "wall_s": 1.0},
            "promotion": {"decision": "promoted", "decided_at": "2026-11-26T01:00:00+00:00", "margin": 0.01,
                          "candidate": {"version": "v1", "top1": 0.8, "top2": 1.0, "per_dataset": scores},
                          "production": {"version": "v0", "top1": 0.7, "top2": 1.0,
                                         "per_dataset": [{**s, "top1": 0.93 if i == 0 else 0.1}
                                                         for i, s in enumerate(scores)]}}}
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps(card))
    shown = build_report(str(bundle), StorageConfig())[1]
    t = calibration["temperature"]
    assert f"T = {t:.4g}, fitted on the validation split" in shown
    assert f"test ECE {test['ece_uncalibrated']:.4f} before, {test['ece']:.4f} after" in shown
    assert "reliability diagram before and after calibration" in shown
    for d in datasets:
        assert d["uri"] in shown and d["fingerprint"][:12] in shown
    # The retrain's per-dataset scores: the candidate lost on the first dataset, gained on the second.
    assert f"test top-1 on s3://data/{PATIENT}/" in shown and "candidate 0.9100 vs production 0.9300" in shown
    assert "candidate 0.4200 vs production 0.1000" in shown
    hidden = build_report(str(bundle), StorageConfig(), hide_sources=True)[1]
    assert PATIENT not in hidden and "reviewed-1" not in hidden and "a" * 12 in hidden

    # The diagram has two panels side by side (before, after): about twice as wide as high.
    from io import BytesIO

    from PIL import Image

    diagram = re.search(r'alt="reliability diagram before and after calibration" src="data:image/png;base64,'
                        r'([A-Za-z0-9+/=]+)"', shown)
    width, height = Image.open(BytesIO(base64.b64decode(diagram.group(1)))).size
    assert width > 1.8 * height
