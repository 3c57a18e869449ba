"""`fpc-ray label` against a real S3 server (SeaweedFS on loopback) and a real local Ray."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from fpc_ray.bundle import load_bundle
from fpc_ray.data.fetal_planes import CLASS_NAMES, read_fetal_planes
from fpc_ray.data.transforms import decode_image_bytes, letterbox
from fpc_ray.inference import predict_probs
from fpc_ray.label.pipeline import LabelOptions, run_labelling
from fpc_ray.label.schema import LABEL_SCHEMA, error_kind
from fpc_ray.storage import resolve
from tests import fixtures_archive as fx

# Every test here but the block-shaping one uses `env` (Ray and S3): conftest marks those slow.


@pytest.fixture(scope="module")
def env(s3_server, ray_cluster, trained_bundle):
    """The session's Ray cluster (started after the S3 variables are set), the session's trained
    bundle copied to S3 (the actors load it from there) and the phantom data it was trained on."""
    client = s3_server.client()
    bundle = Path(trained_bundle["bundle"])
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        client.upload_file(str(path), "test", f"models/label/{path.relative_to(bundle).as_posix()}")
    return {"s3": s3_server, "data": trained_bundle["data"], "model": "s3://test/models/label",
            "ray_address": ray_cluster}


def _put(client, key: str, body: bytes) -> None:
    client.put_object(Bucket="test", Key=key, Body=body)


def _committed_rows(output: str):
    loc = resolve(output)
    runs = [r for r in loc.fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(loc.path))
            if r.base_name.startswith("run=")]
    tables = []
    for r in runs:
        if resolve(f"{output}/{r.base_name}/_SUCCESS.json").exists():
            tables.append(pads.dataset(r.path, filesystem=loc.fs, format="parquet").to_table())
    return tables


def test_archive_with_every_kind_of_input(env, tmp_path):
    client = env["s3"].client()
    db = read_fetal_planes(env["data"])
    gray = np.asarray(Image.open(io.BytesIO(db.image_location(db.records[0]).read_bytes())))
    truth = {}
    prefix = "archive/2026/11/24/"
    for r in db.records[:12]:  # phantom PNGs with known planes, in study folders
        key = f"{prefix}study-{r.patient}/{r.image_name}.png"
        _put(client, key, db.image_location(r).read_bytes())
        truth[f"s3://test/{key}"] = r.plane
    cine = [np.roll(gray, k, axis=1) for k in range(4)]
    inputs = {
        "pacs/IM000001": (fx.dicom_mono(gray), 1),                       # no extension, identifiers
        "pacs/cine_rgb.dcm": (fx.dicom_rgb_multiframe(cine), 4),
        "pacs/cine_jpeg.dcm": (fx.dicom_jpeg_ybr_cine(cine), 4),
        "pacs/rle.dcm": (fx.dicom_rle(gray), 1),
        "pacs/j2k.dcm": (fx.dicom_j2k(gray), 1),
        "pacs/big_endian.dcm": (fx.dicom_big_endian_16bit(gray), 1),
        "pacs/palette.dcm": (fx.dicom_palette(gray), 1),
        "raster/frame.jpg": (fx.jpeg(gray), 1),
        "raster/deep.png": (fx.png(gray.astype(np.uint16) * 257), 1),
        "raster/rgba.png": (fx.png(np.dstack([gray, gray, gray, np.full_like(gray, 255)])), 1),
    }
    broken = {
        "broken/empty.png": (b"", "empty"),
        "broken/readme.txt": (b"not an image", "not_an_image"),
        "broken/cut.png": (fx.png(gray)[:80], "truncated"),
        "broken/nopixels.dcm": (fx.dicom_without_pixels(), "no_pixels"),
        "broken/bomb.png": (fx.png_bomb(), "too_large"),
    }
    for key, (body, _) in {**inputs, **broken}.items():
        _put(client, prefix + key, body)

    output = "s3://test/labels"
    summary = run_labelling(env["model"], "s3://test/archive/2026/11/24/", output, LabelOptions(run_id="first"))
    expected_rows = len(truth) + sum(n for _, n in inputs.values()) + len(broken)
    assert summary["objects"]["labelled"] == len(truth) + len(inputs) + len(broken)
    assert summary["rows"] == expected_rows
    assert summary["errors_by_kind"] == {kind: 1 for _, kind in broken.values()}

    table = pads.dataset("test/labels/run=first", filesystem=resolve(output).fs, format="parquet").to_table()
    assert table.schema.remove_metadata() == LABEL_SCHEMA
    assert json.loads(table.schema.metadata[b"fpc_ray.class_names"]) == list(CLASS_NAMES)
    rows = table.to_pylist()
    assert len(rows) == expected_rows
    by_uri = {}
    for row in rows:
        by_uri.setdefault(row["source_uri"], []).append(row)
    # Every object accounted for, with the right number of frames.
    for key, (_, n) in inputs.items():
        frames = sorted(r["frame"] for r in by_uri[f"s3://test/{prefix}{key}"])
        assert frames == list(range(n)), key
    for key, (_, kind) in broken.items():
        (row,) = by_uri[f"s3://test/{prefix}{key}"]
        assert error_kind(row["error"]) == kind and row["label"] is None and row["gradcam_png"] is None
    # Each phantom's probabilities are the bundle's own, run in this process on the same image
    # (decoded and letterboxed as training does): what the labelling path guarantees, whatever a
    # short training run on this CPU happened to learn.
    bundle = load_bundle(env["model"])
    size = bundle.card["input"]["size"]
    uris = sorted(truth)
    images = np.stack([letterbox(decode_image_bytes(resolve(uri).read_bytes()), size) for uri in uris])
    want = predict_probs(bundle.model, images, bundle.card["input"]["mean"], bundle.card["input"]["std"],
                         temperature=bundle.temperature)
    for uri, p in zip(uris, want, strict=True):
        (row,) = by_uri[uri]
        np.testing.assert_allclose(row["probabilities"], p, atol=2e-3, err_msg=uri)
        if np.sort(p)[-1] - np.sort(p)[-2] > 5e-3:  # not a near-tie, where rounding may pick either
            assert row["label"] == CLASS_NAMES[int(np.argmax(p))], uri
    labelled = [row for row in rows if row["error"] is None]
    assert len(labelled) == expected_rows - len(broken)
    for row in labelled:
        assert max(Image.open(io.BytesIO(row["gradcam_png"])).size) == 128  # the thumbnail's long side
        assert abs(sum(row["probabilities"]) - 1) < 1e-3
        assert row["label"] == CLASS_NAMES[row["label_index"]]
    dicom = by_uri[f"s3://test/{prefix}pacs/IM000001"][0]
    assert dicom["study_uid"] and dicom["sop_uid"] and dicom["error"] is None
    # No patient identifier anywhere: rows, Parquet metadata, the run summary.
    success = resolve(f"{output}/run=first/_SUCCESS.json").read_text()
    blob = repr(rows) + repr(table.schema.metadata) + success
    for value in fx.PATIENT.values():
        assert value not in blob and value.replace("^", " ") not in blob

    # The nightly rerun adds nothing.
    again = run_labelling(env["model"], "s3://test/archive/2026/11/24/", output, LabelOptions(run_id="second"))
    assert again["objects"]["labelled"] == 0 and again["rows"] == 0

    # The GPU nodes' design (decode tasks -> predictors decoding the JPEG frames -> overlay tasks),
    # here on the CPU: the same rows, and no identifier either.
    opts = LabelOptions(run_id="split", stages="split", jpeg_on_gpu=True)
    split = run_labelling(env["model"], "s3://test/archive/2026/11/24/", "s3://test/labels-split", opts)
    assert (split["rows"], split["errors_by_kind"]) == (summary["rows"], summary["errors_by_kind"])
    split_rows = pads.dataset("test/labels-split/run=split", filesystem=resolve(output).fs,
                              format="parquet").to_table().to_pylist()
    by_frame = {(r["source_uri"], r["frame"]): r for r in split_rows}
    for row in rows:
        other = by_frame[(row["source_uri"], row["frame"])]
        assert (other["error"], other["sop_uid"]) == (row["error"], row["sop_uid"])
        # The GPU design's JPEG decoder may differ by a gray level: a near tie of the test's small
        # model may then flip to its runner-up, never to a third class.
        close_call = row["label"] is not None and row["confidence"] - row["top2_confidence"] < 0.1
        assert other["label"] == row["label"] or (close_call and other["label"] == row["top2_label"])
        assert (other["gradcam_png"] is None) == (row["gradcam_png"] is None)
    for value in fx.PATIENT.values():
        assert value not in repr(split_rows)


def _label_cmd(model, archive, output, *extra):
    return [sys.executable, "-m", "fpc_ray.cli", "label", "--model", model, "--input", archive,
            "--output", output, "--cam", "gradcam", *extra]


def _joining(env) -> dict:
    """A driver's environment that joins the module's Ray cluster (as inside a Ray job) instead of
    starting its own, which costs several seconds on 2 cores. Its actors die with it."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": env["ray_address"]}


def _start(cmd, env=None):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _wait_for_line(proc, needle: str, timeout: float = 120) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"no {needle!r} in output: {''.join(seen)[-2000:]}")


@pytest.fixture(scope="module")
def big_archive(env):
    """The 120 phantom PNGs: with 4 per batch, a run stages its first part long before its last."""
    client = env["s3"].client()
    db = read_fetal_planes(env["data"])
    for r in db.records:
        _put(client, f"big/{r.image_name}.png", db.image_location(r).read_bytes())
    return "s3://test/big/", len(db.records)


def _wait_for_staged_part(server, output_key: str, proc, timeout: float = 180) -> None:
    """Block until the run has written at least one Parquet part to its staging area."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        listing = client.list_objects_v2(Bucket="test", Prefix=f"{output_key}/_staging/")
        if any(o["Key"].endswith(".parquet") for o in listing.get("Contents", [])):
            return
        time.sleep(0.2)
    raise AssertionError("the run never staged a part (or ended first)")


def test_killed_run_commits_nothing_and_rerun_completes(env, big_archive):
    archive, n = big_archive
    output = "s3://test/labels-kill"
    proc = _start(_label_cmd(env["model"], archive, output, "--batch-size", "4"), _joining(env))
    _wait_for_line(proc, "to label")
    _wait_for_staged_part(env["s3"], "labels-kill", proc)  # midway: some rows written, not committed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _committed_rows(output)
    done = subprocess.run(_label_cmd(env["model"], archive, output), capture_output=True, text=True,
                          env=_joining(env), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (table,) = _committed_rows(output)
    uris = table["source_uri"].to_pylist()
    assert len(uris) == n and len(set(uris)) == n


def test_s3_outage_mid_run_fails_cleanly_or_retries_then_rerun_completes(env, big_archive):
    archive, n = big_archive
    output = "s3://test/labels-outage"
    proc = _start(_label_cmd(env["model"], archive, output, "--batch-size", "4"), _joining(env))
    _wait_for_line(proc, "to label")
    _wait_for_staged_part(env["s3"], "labels-outage", proc)
    # Killed, not stopped: an outage gives no notice, and everything S3 acknowledged is on disk.
    # The run meets it for as long as the server takes to come back (about 3 s), which its S3
    # retries ride out; an outage held past them fails the run only after ~100 s (measured).
    env["s3"].stop(grace=0)
    env["s3"].start()
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:  # failed cleanly: one error line, nothing committed
        errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, out[-3000:]
        assert not _committed_rows(output)
        done = subprocess.run(_label_cmd(env["model"], archive, output), capture_output=True, text=True,
                              env=_joining(env), timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    (table,) = _committed_rows(output)
    assert sorted(set(table["source_uri"].to_pylist())) == sorted(table["source_uri"].to_pylist())
    assert table.num_rows == n


def _nightly_job():
    """jobs/nightly_label.py as a module (``jobs`` is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "jobs" / "nightly_label.py"
    spec = importlib.util.spec_from_file_location("nightly_label", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nightly_job_labels_the_day_looks_back_and_is_idempotent(env, tmp_path, capsys):
    """The job's main() in this process, on the session's cluster: a subprocess per night would
    pay a driver's start-up each (the job submitted to a cluster is tested in test_cluster.py)."""
    db = read_fetal_planes(env["data"])
    day = tmp_path / "archive" / "2026" / "11" / "24"
    day.mkdir(parents=True)
    for r in db.records[:3]:
        (day / f"{r.image_name}.png").write_bytes(db.image_location(r).read_bytes())
    (day / "broken.png").write_bytes(b"\x89PNG")
    other_day = tmp_path / "archive" / "2026" / "11" / "23"
    other_day.mkdir(parents=True)
    (other_day / "day-before.png").write_bytes(db.image_location(db.records[4]).read_bytes())
    job = _nightly_job()

    def nightly(date: str, model: str = env["model"]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = job.main(["--model", model, "--archive", str(tmp_path / "archive"), "--output", str(tmp_path / "out"),
                         "--date", date])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = nightly("2026-11-24")  # the day and, looking back, the day before (22nd, 21st: no folders)
    assert code == 0, out + err
    summary = json.loads((tmp_path / "out" / "run=nightly-2026-11-24" / "_SUCCESS.json").read_text())
    assert summary["objects"]["labelled"] == 5 and summary["rows"] == 5 and summary["errors"] == 1
    assert summary["input"] == str(day) and len(summary["inputs"]) == 2
    # An object lands in the 24th's folder after the 24th was committed: the next night takes it.
    (day / "late.png").write_bytes(db.image_location(db.records[5]).read_bytes())
    code, out, err = nightly("2026-11-25")
    assert code == 0, out + err
    summary = json.loads((tmp_path / "out" / "run=nightly-2026-11-25" / "_SUCCESS.json").read_text())
    assert summary["objects"]["labelled"] == 1 and summary["rows"] == 1
    code, out, _ = nightly("2026-11-24")
    assert code == 0 and "already committed" in out
    code, _, err = nightly("2026-11-26", model=str(tmp_path / "no-model"))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # Ray may log there too
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "no-model" in errors[0]


def test_three_runs_at_once_on_one_output_commit_every_object_once(env):
    """Three `fpc-ray label` processes at once on one output: two with the same run id (one
    commits, the other refuses with one line) and one with another run id (it commits too, and
    whichever of the two committers comes second drops the rows the first committed). Every object
    ends with exactly one row set, accounted for once."""
    client = env["s3"].client()
    db = read_fetal_planes(env["data"])
    output = "s3://test/labels-concurrent"
    archive = "s3://test/concurrent/"
    for r in db.records[:12]:
        _put(client, f"concurrent/{r.image_name}.png", db.image_location(r).read_bytes())
    # All join the session's cluster, as jobs submitted to one cluster would: local clusters
    # starting at once would cost most of this test's time, and prove nothing more.
    procs = [_start(_label_cmd(env["model"], archive, output, "--batch-size", "4", "--run-id", rid), _joining(env))
             for rid in ("same", "same", "other")]
    (first, first_out), (second, second_out), (other, other_out) = [(p.wait(timeout=600), p.stdout.read())
                                                                    for p in procs]
    assert other == 0, other_out[-3000:]
    assert sorted([first, second])[0] == 0, first_out[-3000:] + second_out[-3000:]
    code, out = (second, second_out) if first == 0 else (first, first_out)
    # Refused at commit (1), or at start-up when the winner had already committed (2).
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code in (1, 2) and len(errors) == 1 and "Traceback" not in out, out[-3000:]

    expected = sorted(f"{archive}{r.image_name}.png" for r in db.records[:12])
    rows: list[str] = []
    for table in _committed_rows(output):
        if table.num_rows:  # a run whose every object another committed first has no rows (nor columns)
            rows += table["source_uri"].to_pylist()
    assert sorted(rows) == expected
    objects = [u for t in _committed_objects(output) for u in t]
    assert sorted(objects) == expected
    # They ran at once: both committers listed and labelled all twelve, and the second dropped its
    # rows of every object the first had committed meanwhile.
    summaries = [json.loads(client.get_object(Bucket="test", Key=f"labels-concurrent/run={rid}/_SUCCESS.json")
                            ["Body"].read()) for rid in ("same", "other")]
    assert sorted(s["objects"]["dropped_late"] for s in summaries) == [0, 12], summaries


def _committed_objects(output: str) -> list[list[str]]:
    """The `_objects.parquet` URIs of every committed run."""
    from fpc_ray.label.runs import OBJECTS, committed_runs

    loc = resolve(output)
    return [pads.dataset(run.join(OBJECTS).path, filesystem=loc.fs, format="parquet").to_table()["uri"].to_pylist()
            for run in committed_runs(loc)]


def test_label_user_errors_are_one_line(env, tmp_path):
    from typer.testing import CliRunner

    from fpc_ray.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["label", "--model", env["model"], "--input", str(tmp_path / "nope"),
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.strip().startswith("error: ")
    assert "no such input prefix" in result.output and len(result.output.strip().splitlines()) == 1
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.txt").write_text("not an image")
    result = runner.invoke(app, ["label", "--model", env["model"], "--input", str(junk),
                                 "--output", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "above --max-error-rate" in result.output
    assert not list((tmp_path / "out2").glob("run=*/_SUCCESS.json"))
    result = runner.invoke(app, ["label", "--model", str(tmp_path), "--input", str(junk),
                                 "--output", str(tmp_path / "out3")])
    assert result.exit_code == 2 and "not a model bundle" in result.output


@pytest.mark.parametrize("objects,batch,workers", [(2000, 32, 1), (20000, 32, 1), (40, 32, 4), (7, 32, 1),
                                                   (1000, 32, 4)])
def test_object_blocks_are_whole_batches_and_cover_every_object_once(objects, batch, workers):
    from fpc_ray.label.pipeline import _object_blocks

    todo = [{"uri": f"s3://a/{i}", "size": i, "mtime_ns": 0} for i in range(objects)]
    blocks = _object_blocks(todo, batch, workers)
    assert [u for b in blocks for u in b["uri"].to_pylist()] == [o["uri"] for o in todo]
    assert len(blocks) >= min(workers, objects)
    if objects >= batch * workers:  # every block but the last is whole batches
        assert all(b.num_rows % batch == 0 for b in blocks[:-1])
