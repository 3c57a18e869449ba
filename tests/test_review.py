"""Review batches: `fpc-ray review export` / `import` on committed runs written directly (no Ray),
and the phantoms that a first model confuses (`synth --confuse`)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fpc_ray.data.fetal_planes import CLASS_NAMES, read_fetal_planes
from fpc_ray.data.synth import render_phantom, synthesize
from fpc_ray.errors import UserError
from fpc_ray.label.decode import decode_object
from fpc_ray.label.schema import LABEL_SCHEMA
from fpc_ray.review import Strategy
from fpc_ray.review.importer import is_test_study, patient_num, pick_test_studies
from fpc_ray.review.select import frame_id, ranked
from tests.fixtures_archive import dicom_jpeg_ybr_cine, jpeg, png
from tests.test_cli import invoke, one_error_line

CINE_STUDY = "1.2.826.0.1.3680043.8.498.1"


def _row(uri: str, data: bytes, frame: int, truth: str, label: str, confidence: float, run_id: str,
         study: str | None = None, error: str | None = None) -> dict:
    """A LABEL_SCHEMA row with a made-up prediction; ``truth`` is kept aside for the simulated
    reviewer (not a column)."""
    top2 = CLASS_NAMES[(CLASS_NAMES.index(label) + 1) % len(CLASS_NAMES)]
    cam = png(np.full((8, 8), int(confidence * 255), np.uint8))
    return {"source_uri": uri, "frame": frame, "study_uid": study, "series_uid": None, "sop_uid": None,
            "width": 96, "height": 72, "content_sha256": hashlib.sha256(data).hexdigest(),
            "label": None if error else label, "label_index": None if error else CLASS_NAMES.index(label),
            "confidence": confidence, "top2_label": top2, "top2_confidence": (1 - confidence) * 0.9,
            "probabilities": None, "gradcam_png": None if error else cam, "model_version": "m-1",
            "run_id": run_id, "labelled_at": None, "error": error, "_truth": truth}


def write_run(labels: Path, run_id: str, rows: list[dict], committed: bool = True) -> Path:
    """A run folder as runs.commit leaves it: parts, then the marker (left out: uncommitted)."""
    run = labels / f"run={run_id}"
    run.mkdir(parents=True)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "_truth"} for r in rows], schema=LABEL_SCHEMA)
    pq.write_table(table, run / "part-x-00000.parquet")
    if committed:
        (run / "_SUCCESS.json").write_text(json.dumps({"run_id": run_id}))
    return run


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """Ten phantom PNGs in two folders, a JPEG and a 3-frame DICOM cine; two committed runs and
    one uncommitted one over them, with confidences chosen so every strategy's pick is known."""
    root = tmp_path_factory.mktemp("review")
    src, labels = root / "archive", root / "labels"
    rows_a, rows_b, rows_c = [], [], []
    for i in range(10):
        truth = CLASS_NAMES[i % 6]
        data = png(render_phantom(truth, np.random.default_rng(i), 96, 72))
        path = src / ("study_a" if i < 5 else "study_b") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # The model is wrong on frames 0 and 1 (it says the next class), least sure of low i.
        label = CLASS_NAMES[(i + 1) % 6] if i < 2 else truth
        target = rows_c if i == 9 else rows_a if i < 6 else rows_b
        target.append(_row(str(path), data, 0, truth, label, 0.30 + 0.05 * i, "20260101T000000Z"
                           if target is rows_a else "20260102T000000Z"))
    rows_c[0]["confidence"] = 0.01  # the least confident of all, but its run is not committed
    frames = [np.full((72, 96), v, np.uint8) for v in (40, 120, 200)]
    for k, f in enumerate(frames):
        cv2.circle(f, (20 + 25 * k, 36), 10, 255, -1)
    cine = dicom_jpeg_ybr_cine(frames)
    (src / "cine.dcm").write_bytes(cine)
    for k in range(3):  # frame 2 is the least confident frame of all committed ones
        rows_a.append(_row(str(src / "cine.dcm"), cine, k, "Fetal brain", "Fetal brain", 0.52 - 0.2 * k,
                           "20260101T000000Z", study=CINE_STUDY))
    jpg = jpeg(render_phantom("Other", np.random.default_rng(99), 96, 72))
    (src / "study_b" / "x.jpg").write_bytes(jpg)
    rows_b.append(_row(str(src / "study_b" / "x.jpg"), jpg, 0, "Other", "Other", 0.95, "20260102T000000Z"))
    rows_b.append(_row(str(src / "broken.png"), b"xx", 0, "Other", "Other", 0.0, "20260102T000000Z",
                       error="truncated: image data is incomplete"))
    write_run(labels, "20260101T000000Z", rows_a)
    write_run(labels, "20260102T000000Z", rows_b)
    write_run(labels, "20260103T000000Z", rows_c, committed=False)
    rows = rows_a + rows_b
    truth = {frame_id(r["content_sha256"], r["frame"]): r["_truth"] for r in rows + rows_c if not r["error"]}
    return {"root": root, "labels": labels, "rows": rows, "truth": truth, "cine": cine, "uncommitted": rows_c}


def _by_confidence(rows: list[dict]) -> list[str]:
    good = sorted((r for r in rows if not r["error"]), key=lambda r: r["confidence"])
    return [frame_id(r["content_sha256"], r["frame"]) for r in good]


def _manifest(batch: Path) -> list[dict]:
    return pq.read_table(batch / "manifest.parquet").to_pylist()


def export(archive, name: str, *args):
    """A batch in a folder of its own: batches side by side would leave out each other's frames."""
    batch = archive["root"] / f"project-{name}" / name
    return batch, invoke("review", "export", archive["labels"], "--output", batch, *args)


# --- choosing frames --------------------------------------------------------------------------

def _candidates() -> list[dict]:
    rows = []
    for i in range(12):
        conf = 0.3 + 0.05 * i
        rows.append({"frame_id": f"f{i:02d}", "label": CLASS_NAMES[i % 3], "confidence": conf,
                     "top2_confidence": conf - (0.02 if i % 4 == 0 else 0.2)})
    return rows


def test_each_strategy_orders_frames_as_it_says():
    rows = _candidates()
    least, cap = ranked(rows, Strategy.least_confident, 4, None, 0)
    assert [r["frame_id"] for r in least][:4] == ["f00", "f01", "f02", "f03"] and cap is None
    margin, _ = ranked(rows, Strategy.margin, 4, None, 0)
    assert [r["frame_id"] for r in margin][:3] == ["f00", "f04", "f08"]  # margins of 0.02 first
    per_class, cap = ranked(rows, Strategy.per_class, 6, None, 0)
    first = [r["frame_id"] for r in per_class][:6]
    assert cap == 2 and first == ["f00", "f01", "f02", "f03", "f04", "f05"]  # each class's least confident, in turn
    assert {r["label"] for r in rows if r["frame_id"] in first[:3]} == set(CLASS_NAMES[:3])
    shuffled = [r["frame_id"] for r in ranked(rows, Strategy.random, 4, None, 7)[0]]
    assert shuffled == [r["frame_id"] for r in ranked(rows, Strategy.random, 4, None, 7)[0]]
    assert shuffled != [r["frame_id"] for r in ranked(rows, Strategy.random, 4, None, 8)[0]]
    assert sorted(shuffled) == sorted(r["frame_id"] for r in rows)


# --- export -------------------------------------------------------------------------------------

def test_export_writes_a_label_studio_batch_of_the_least_confident_committed_frames(archive):
    batch, result = export(archive, "b1", "--n", 4)
    assert result.exit_code == 0, result.output
    wanted = _by_confidence(archive["rows"])[:4]
    manifest = _manifest(batch)
    assert [m["frame_id"] for m in manifest] == wanted  # never the uncommitted run's, never an error row
    uncommitted = {frame_id(r["content_sha256"], 0) for r in archive["uncommitted"]}
    assert not uncommitted & {m["frame_id"] for m in manifest}

    tasks = json.loads((batch / "tasks.json").read_text())
    assert [t["data"]["frame_id"] for t in tasks] == wanted
    config = ET.fromstring((batch / "labeling_config.xml").read_text())
    image = config.find("Image")
    controls = {c.get("name"): c for c in config.findall("Choices")}
    assert image.get("value") == "$image" and set(controls) == {"plane", "brain_plane"}
    assert [c.get("value") for c in controls["plane"].findall("Choice")][:6] == list(CLASS_NAMES)
    assert controls["plane"].get("required") == "true" and controls["brain_plane"].get("required") is None
    for task, m in zip(tasks, manifest, strict=True):
        assert (batch / task["data"]["image"]).is_file()  # a local batch: paths relative to it
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "m-1" and prediction["score"] == pytest.approx(m["confidence"], abs=1e-4)
        (result_item,) = prediction["result"]
        assert result_item["from_name"] in controls and result_item["to_name"] == image.get("name")
        assert result_item["type"] == "choices" and result_item["value"] == {"choices": [m["label"]]}
    header = (batch / "tasks.csv").read_text().splitlines()[0].split(",")
    assert header == ["frame_id", "source_uri", "frame", "study_uid", "predicted", "confidence", "label",
                      "brain_plane"]
    meta = json.loads((batch / "batch.json").read_text())
    assert meta["options"]["strategy"] == "least-confident" and meta["model_versions"] == ["m-1"]
    assert len(meta["runs"]) == 2


def test_export_extracts_the_right_cine_frame_and_its_cam(archive):
    batch, result = export(archive, "b-cine", "--n", 1, "--format", "csv")
    assert result.exit_code == 0, result.output
    (m,) = _manifest(batch)
    assert m["source_uri"].endswith("cine.dcm") and m["frame"] == 2 and m["study"] == CINE_STUDY
    written = cv2.imread(str(batch / "images" / f"{m['frame_id']}.png"), cv2.IMREAD_UNCHANGED)
    frames = dict(decode_object("cine.dcm", archive["cine"]).frames)
    assert np.array_equal(written, frames[2]) and not np.array_equal(written, frames[0])
    row = next(r for r in archive["rows"] if r["frame"] == 2)
    assert (batch / "cams" / f"{m['frame_id']}.png").read_bytes() == row["gradcam_png"]
    assert not (batch / "tasks.json").exists() and (batch / "tasks.csv").exists()


def test_frames_of_earlier_batches_are_not_exported_again(archive, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(archive["labels"], labels)
    first = invoke("review", "export", labels, "--output", tmp_path / "batches" / "one", "--n", 3)
    second = invoke("review", "export", labels / "run=20260101T000000Z", "--output", tmp_path / "batches" / "two",
                    "--n", 3)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    one, two = (_manifest(tmp_path / "batches" / b) for b in ("one", "two"))
    assert not {m["frame_id"] for m in one} & {m["frame_id"] for m in two}
    in_run_a = [r for r in archive["rows"] if r["run_id"] == "20260101T000000Z"]
    assert [m["frame_id"] for m in two] == [f for f in _by_confidence(in_run_a) if f not in
                                             {m["frame_id"] for m in one}][:3]
    again = invoke("review", "export", labels, "--output", tmp_path / "batches" / "one", "--n", 1)
    assert again.exit_code == 2 and "already holds a review batch" in one_error_line(again)


def test_a_changed_or_vanished_source_is_skipped_never_exported_with_other_pixels(archive, tmp_path):
    src = tmp_path / "archive"
    shutil.copytree(archive["root"] / "archive", src)
    rows = [{**r, "source_uri": r["source_uri"].replace(str(archive["root"] / "archive"), str(src))}
            for r in archive["rows"]]
    write_run(tmp_path / "labels", "20260101T000000Z", rows)
    order = sorted((r for r in rows if not r["error"]), key=lambda r: r["confidence"])
    cine, png0 = order[0]["source_uri"], order[1]["source_uri"]
    Path(cine).write_bytes(png(np.zeros((72, 96), np.uint8)))  # replaced: its two frames in the top 3
    Path(png0).unlink()  # gone
    batch = tmp_path / "batches" / "b"
    result = invoke("review", "export", tmp_path / "labels", "--output", batch, "--n", 2)
    assert result.exit_code == 0, result.output
    assert "skipped 3 frame(s)" in result.output and "changed 2, vanished 1" in result.output
    still = [frame_id(r["content_sha256"], r["frame"]) for r in order if r["source_uri"] not in (cine, png0)]
    assert [m["frame_id"] for m in _manifest(batch)] == still[:2]  # the next in line took their places


def test_a_relabelled_object_exports_its_current_frame_with_its_current_pixels(tmp_path):
    src = tmp_path / "archive" / "x.png"
    src.parent.mkdir()
    old, new = (render_phantom(p, np.random.default_rng(5), 96, 72) for p in ("Fetal femur", "Fetal thorax"))
    src.write_bytes(png(old))
    first = _row(str(src), src.read_bytes(), 0, "Fetal femur", "Fetal femur", 0.4, "20260101T000000Z")
    src.write_bytes(png(new))  # replaced, then labelled again
    second = _row(str(src), src.read_bytes(), 0, "Fetal thorax", "Fetal thorax", 0.5, "20260102T000000Z")
    write_run(tmp_path / "labels", "20260101T000000Z", [first])
    write_run(tmp_path / "labels", "20260102T000000Z", [second])
    batch = tmp_path / "batches" / "b"
    result = invoke("review", "export", tmp_path / "labels", "--output", batch, "--n", 2)
    assert result.exit_code == 0, result.output
    (m,) = _manifest(batch)
    assert m["frame_id"] == frame_id(second["content_sha256"], 0) and m["run_id"] == "20260102T000000Z"
    written = cv2.imread(str(batch / "images" / f"{m['frame_id']}.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, new)
    assert not (batch / "images" / f"{frame_id(first['content_sha256'], 0)}.png").exists()
    assert "changed 1" in result.output  # the old content's row, not what the object holds now


def test_export_of_runs_with_error_rows_only_is_one_line(tmp_path):
    rows = [_row(str(tmp_path / "broken.png"), b"xx", 0, "Other", "Other", 0.0, "20260101T000000Z",
                 error="truncated: image data is incomplete")]
    write_run(tmp_path / "labels", "20260101T000000Z", rows)
    result = invoke("review", "export", tmp_path / "labels", "--output", tmp_path / "batches" / "b", "--n", 2)
    assert result.exit_code == 2 and "no labelled frames in" in one_error_line(result)
    assert not (tmp_path / "batches").exists()


def test_per_class_with_another_strategy_is_refused(archive, tmp_path):
    result = invoke("review", "export", archive["labels"], "--output", tmp_path / "b", "--n", 2, "--per-class", 1)
    assert result.exit_code == 2 and "--per-class applies to --strategy per-class only" in one_error_line(result)
    assert not (tmp_path / "b").exists()


def test_export_beside_a_file_is_one_line(archive, tmp_path):
    (tmp_path / "batches").write_text("not a folder")  # the parent whose commit lock export takes
    result = invoke("review", "export", archive["labels"], "--output", tmp_path / "batches" / "b", "--n", 2)
    assert result.exit_code == 2 and "_commit.lock" in one_error_line(result)
    assert (tmp_path / "batches").read_text() == "not a folder"


def test_export_refuses_uncommitted_runs_and_empty_prefixes(archive, tmp_path):
    result = invoke("review", "export", archive["labels"] / "run=20260103T000000Z", "--output", tmp_path / "b",
                    "--n", 2)
    assert result.exit_code == 2 and "not committed" in one_error_line(result)
    result = invoke("review", "export", tmp_path, "--output", tmp_path / "b", "--n", 2)
    assert result.exit_code == 2 and "no committed labelling run" in one_error_line(result)


def test_export_reads_runs_from_and_writes_the_batch_to_s3(archive, s3_server):
    client = s3_server.client()
    for path in archive["labels"].rglob("*"):
        if path.is_file():
            client.put_object(Bucket="test", Key=f"review/labels/{path.relative_to(archive['labels'])}",
                              Body=path.read_bytes())
    result = invoke("review", "export", "s3://test/review/labels", "--output", "s3://test/review/batches/b1",
                    "--n", 3, "--strategy", "per-class", "--per-class", 1)
    assert result.exit_code == 0, result.output
    tasks = json.loads(client.get_object(Bucket="test", Key="review/batches/b1/tasks.json")["Body"].read())
    assert len({t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks}) == 3  # one per class
    for t in tasks:
        assert t["data"]["image"] == f"s3://test/review/batches/b1/images/{t['data']['frame_id']}.png"
        client.head_object(Bucket="test", Key=t["data"]["image"].removeprefix("s3://test/"))
        client.head_object(Bucket="test", Key=f"review/batches/b1/cams/{t['data']['frame_id']}.png")
    second = invoke("review", "export", "s3://test/review/labels", "--output", "s3://test/review/batches/b2",
                    "--n", 20, "--format", "csv")
    assert second.exit_code == 0, second.output
    assert "3 in earlier batches left out" in second.output  # the batch beside it, found on S3
    csv_rows = client.get_object(Bucket="test", Key="review/batches/b2/tasks.csv")["Body"].read().decode()
    assert len(csv_rows.splitlines()) == 1 + 13 - 3


def _export_after(barrier, jobs: list[tuple[str, str]], results) -> None:
    """A second process's exports (``multiprocessing`` spawn target): each starts the moment the
    other process is ready to start its own."""
    from fpc_ray.review.export import ExportOptions, export_batch

    for labels, output in jobs:
        barrier.wait(timeout=120)
        results.put((output, export_batch([labels], output, ExportOptions(n=6, formats=("csv",)),
                                          echo=lambda _: None)["already_exported"]))


def test_two_exports_started_together_into_sibling_batches_share_no_frame(archive, tmp_path, s3_server):
    """Two processes at once, locally and on S3 (the issue: 8 of 8 frames shared, 3 tries of 3):
    the parent's commit lock makes them take turns, so the second leaves out what the first chose."""
    import multiprocessing

    client = s3_server.client()
    prefix = f"race/{tmp_path.name}"
    for path in archive["labels"].rglob("*"):
        if path.is_file():
            client.put_object(Bucket="test", Key=f"{prefix}/labels/{path.relative_to(archive['labels'])}",
                              Body=path.read_bytes())
    parents = {"local": str(tmp_path / "batches"), "s3": f"s3://test/{prefix}/batches"}
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_export_after, args=(barrier, [
        (str(archive["labels"]), f"{parents['local']}/{name}"),
        (f"s3://test/{prefix}/labels", f"{parents['s3']}/{name}")], results)) for name in ("one", "two")]
    for proc in procs:
        proc.start()
    left_out = [results.get(timeout=180) for _ in range(4)]
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]

    def chosen(batch: str) -> set[str]:
        if batch.startswith("s3://"):
            data = client.get_object(Bucket="test", Key=f"{batch.removeprefix('s3://test/')}/manifest.parquet")
            return set(pq.read_table(io.BytesIO(data["Body"].read())).column("frame_id").to_pylist())
        return {m["frame_id"] for m in _manifest(Path(batch))}

    for parent in parents.values():
        one, two = chosen(f"{parent}/one"), chosen(f"{parent}/two")
        assert len(one) == len(two) == 6 and not one & two, (parent, one & two)
        # The one that took the lock second read the first one's manifest: its 6 frames left out.
        assert sorted(n for out, n in left_out if out.startswith(parent)) == [0, 6], left_out


# --- import -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch(archive) -> Path:
    """A batch of every committed frame (13), for the import tests to answer."""
    path, result = export(archive, "all", "--n", 20)
    assert result.exit_code == 0, result.output
    return path


def _annotation(plane: str | None, brain: str | None = None, cancelled=False, updated="2026-01-02T00:00:00Z"):
    result = [] if plane is None else [{"from_name": "plane", "to_name": "image", "type": "choices",
                                        "value": {"choices": [plane]}}]
    if brain:
        result.append({"from_name": "brain_plane", "to_name": "image", "type": "choices",
                       "value": {"choices": [brain]}})
    return {"id": 1, "result": result, "was_cancelled": cancelled, "updated_at": updated}


def simulated_export(batch: Path, truth: dict) -> list[dict]:
    """Label Studio's JSON export of the batch, reviewed with the ground truth: the first task
    cancelled, the second answered Unsure, the third answered by two reviewers who agree (and a
    third who skipped), the fourth imported twice with the same answer."""
    tasks = json.loads((batch / "tasks.json").read_text())
    out = []
    for i, t in enumerate(tasks):
        answer = truth[t["data"]["frame_id"]]
        annotations = [_annotation(answer, "Trans-thalamic" if answer == "Fetal brain" else None)]
        if i == 0:
            annotations = [_annotation(answer, cancelled=True)]
        elif i == 1:
            annotations = [_annotation("Unsure")]
        elif i == 2:
            annotations += [dict(annotations[0], id=2), _annotation("Other", cancelled=True)]
        out.append({"id": i + 1, **t, "annotations": annotations})
    out.append(dict(out[3]))
    return out


def test_import_of_a_label_studio_export_writes_a_fetal_planes_dataset(archive, batch, tmp_path):
    exported = tmp_path / "project-1-export.json"
    exported.write_text(json.dumps(simulated_export(batch, archive["truth"])))
    manifest = {m["frame_id"]: m for m in _manifest(batch)}
    studies = {m["study"] for m in manifest.values()}  # the PNG folders' depend on tmp_path
    seed = next(s for s in range(100) if 0 < sum(is_test_study(st, 0.34, s) for st in studies) < 3)
    result = invoke("review", "import", exported, "--batch", batch, "--output", tmp_path / "ds",
                    "--test-fraction", 0.34, "--seed", seed)
    assert result.exit_code == 0, result.output
    db = read_fetal_planes(str(tmp_path / "ds"))
    assert len(db.records) == 11  # 13 frames, one cancelled, one unsure
    for rec in db.records:
        fid = rec.image_name.removeprefix("review_")
        assert rec.plane == archive["truth"][fid]
        assert rec.patient == patient_num(manifest[fid]["study"])
        assert rec.brain_plane == ("Trans-thalamic" if rec.plane == "Fetal brain" else "Not A Brain")
        assert db.image_location(rec).read_bytes() == (batch / "images" / f"{fid}.png").read_bytes()
    # Patients are studies: the three cine frames one, the PNGs by folder; 1 of 3 studies in test.
    assert len({r.patient for r in db.records}) == 3
    in_test = {patient_num(s) for s in studies if is_test_study(s, 0.34, seed)}
    assert {r.patient for r in db.records if not r.official_train} == in_test
    assert "warning: 3 studies answered" in result.output  # too few for a split by study to mean much
    patients = {r.patient for r in db.records}
    assert all(len({r.official_train for r in db.records if r.patient == p}) == 1 for p in patients)

    agreement = json.loads((tmp_path / "ds" / "agreement.json").read_text())
    reviewed = [fid for fid in manifest if fid in {r.image_name.removeprefix("review_") for r in db.records}]
    right = sum(manifest[f]["label"] == archive["truth"][f] for f in reviewed)
    assert (agreement["reviewed"], agreement["unsure"], agreement["skipped"]) == (11, 1, 1)
    assert agreement["model_right"] == right and agreement["agreement"] == pytest.approx(right / 11, abs=1e-4)
    wrong_class = archive["truth"][frame_id(archive["rows"][1]["content_sha256"], 0)]  # img1: unsure is img0
    per = agreement["per_class"][wrong_class]
    assert per["model_right"] < per["reviewed"]  # the frames the model got wrong count against their class
    assert f"{right} of 11" in result.output


def test_import_of_the_filled_csv(archive, batch, tmp_path):
    lines = (batch / "tasks.csv").read_text().splitlines()
    filled = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[6] = archive["truth"][cells[0]] if not cells[1].endswith(".jpg") else ""  # the JPEG left blank
        filled.append(",".join(cells))
    answers = tmp_path / "tasks.csv"
    answers.write_text("\n".join(filled) + "\n")
    result = invoke("review", "import", answers, "--batch", batch, "--output", tmp_path / "ds", "--test-fraction", 0)
    assert result.exit_code == 0, result.output
    db = read_fetal_planes(str(tmp_path / "ds"))
    assert len(db.records) == 12 and all(r.official_train for r in db.records)
    assert {r.plane for r in db.records} == set(CLASS_NAMES)
    brain = [r for r in db.records if r.plane == "Fetal brain"]
    assert brain and all(r.brain_plane == "Other" for r in brain)  # a brain frame without a sub-plane


def _filled_rows(batch: Path, truth: dict) -> list[list[str]]:
    """tasks.csv's rows with the ground truth in ``label``, the trailing empty ``brain_plane``
    cell dropped as some spreadsheets do."""
    import csv

    rows = list(csv.reader((batch / "tasks.csv").read_text().splitlines()))
    return [rows[0]] + [[*r[:6], truth[r[0]]] for r in rows[1:]]


ALL_DIGITS = "1234567890123456"  # a frame id a spreadsheet reads as a number: hashes are hex, 1 in ~1700 is so


def _with_an_all_digit_frame_id(batch: Path, truth: dict, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the batch whose second frame's id is all digits, and the truth for it."""
    copy = tmp_path / "digits-batch"
    shutil.copytree(batch, copy)
    manifest = _manifest(copy)
    old = manifest[1]["frame_id"]
    manifest[1]["frame_id"] = ALL_DIGITS
    pq.write_table(pa.Table.from_pylist(manifest, schema=pq.read_schema(copy / "manifest.parquet")),
                   copy / "manifest.parquet")
    (copy / "images" / f"{old}.png").rename(copy / "images" / f"{ALL_DIGITS}.png")
    (copy / "tasks.csv").write_text((copy / "tasks.csv").read_text().replace(old, ALL_DIGITS))
    return copy, {**truth, ALL_DIGITS: truth[old]}


@pytest.mark.parametrize("case", ["comma", "semicolon cp1252", "tab", "numeric frame_id",
                                  "numeric frame_id, 15 digits"])
def test_import_reads_the_csv_as_spreadsheets_save_it(archive, batch, tmp_path, case):
    truth = archive["truth"]
    if case.startswith("numeric"):
        batch, truth = _with_an_all_digit_frame_id(batch, truth, tmp_path)
    rows = _filled_rows(batch, truth)
    delimiter, encoding = {"semicolon cp1252": (";", "cp1252"), "tab": ("\t", "utf-8")}.get(case, (",", "utf-8"))
    if case == "semicolon cp1252":
        rows[0].append("Bemerkung")  # a reviewer's notes column, with non-ASCII text
        rows[1] = [*rows[1], "", "Schädel unscharf, Ø 3 cm"]
    if case.startswith("numeric"):
        assert rows[2][0] == ALL_DIGITS
        # What Excel shows of it in a narrow column, or writes in a wide one (15 significant digits).
        rows[2][0] = "1.23457E+15" if case == "numeric frame_id" else "1234567890123460"
    answers = tmp_path / "answers.csv"
    answers.write_bytes("\n".join(delimiter.join(r) for r in rows).encode(encoding) + b"\n")
    result = invoke("review", "import", answers, "--batch", batch, "--output", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    db = read_fetal_planes(str(tmp_path / "ds"))
    assert sorted(r.image_name for r in db.records) == sorted(f"review_{r[0]}" for r in _filled_rows(batch, truth)[1:])
    assert all(r.plane == truth[r.image_name.removeprefix("review_")] for r in db.records)


@pytest.mark.parametrize("case", ["frame not in the batch", "not its id's number", "another batch's frame id"])
def test_a_frame_id_not_in_the_batch_is_refused_whatever_its_source_and_frame(archive, batch, tmp_path, case):
    """Only a spreadsheet's rendering of a frame's own all-digit id is named by (source_uri, frame)."""
    digits_batch, truth = _with_an_all_digit_frame_id(batch, archive["truth"], tmp_path)
    rows = _filled_rows(digits_batch, truth)
    shown = {"frame not in the batch": "1.23457E+15", "not its id's number": "9.87654E+15",
             "another batch's frame id": "0123456789abcdef"}[case]
    rows[2][0] = shown
    if case == "frame not in the batch":
        rows[2][2] = "7"  # no frame 7 of that object in the batch
    answers = tmp_path / "answers.csv"
    answers.write_text("\n".join(",".join(r) for r in rows) + "\n")
    result = invoke("review", "import", answers, "--batch", digits_batch, "--output", tmp_path / "ds")
    assert result.exit_code == 2 and f"line 3 (frame {shown}): frame not in batch" in one_error_line(result)
    assert not (tmp_path / "ds").exists()


def test_import_of_label_studio_json_min(archive, batch, tmp_path):
    tasks = json.loads((batch / "tasks.json").read_text())
    entries = [{"id": i, **t["data"], "annotator": 1, "plane": archive["truth"][t["data"]["frame_id"]]}
               for i, t in enumerate(tasks)]
    entries[0]["plane"] = {"choices": [entries[0]["plane"]]}
    del entries[1]["plane"]  # not annotated
    brain = next(e for e in entries[2:] if e["plane"] == "Fetal brain")
    brain["brain_plane"] = "Trans-ventricular"
    exported = tmp_path / "min.json"
    exported.write_text(json.dumps(entries))
    result = invoke("review", "import", exported, "--batch", batch, "--output", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    db = {r.image_name: r for r in read_fetal_planes(str(tmp_path / "ds")).records}
    assert len(db) == 12 and db[f"review_{brain['frame_id']}"].brain_plane == "Trans-ventricular"
    assert all(r.plane == archive["truth"][name.removeprefix("review_")] for name, r in db.items())


def _bad_json(batch: Path, truth: dict, case: str) -> tuple[str, str]:
    tasks = simulated_export(batch, truth)
    if case == "unknown class":
        tasks[5]["annotations"] = [_annotation("Fetal liver")]
        return json.dumps(tasks), f"entry 6 (frame {tasks[5]['data']['frame_id']}): unknown class 'Fetal liver'"
    if case == "not in batch":
        tasks[4]["data"]["frame_id"] = "0123456789abcdef"
        return json.dumps(tasks), "entry 5 (frame 0123456789abcdef): frame not in batch"
    if case == "conflict":
        tasks.append({**tasks[6], "annotations": [_annotation("Maternal cervix" if truth[tasks[6]["data"][
            "frame_id"]] != "Maternal cervix" else "Other")]})
        return json.dumps(tasks), f"entry {len(tasks)} (frame {tasks[6]['data']['frame_id']}): conflicting answers"
    if case == "reviewers disagree":
        other = "Maternal cervix" if truth[tasks[6]["data"]["frame_id"]] != "Maternal cervix" else "Other"
        tasks[6]["annotations"].append(_annotation(other, updated="2026-01-03T00:00:00Z"))
        return json.dumps(tasks), (f"entry 7 (frame {tasks[6]['data']['frame_id']}): conflicting answers for one "
                                   f"frame: '{other}' here")
    if case == "brain contradiction":
        fid = next(t for t in tasks if truth[t["data"]["frame_id"]] == "Fetal femur")["data"]["frame_id"]
        for t in tasks:
            if t["data"]["frame_id"] == fid:
                t["annotations"] = [_annotation("Fetal femur", "Trans-cerebellum")]
        return json.dumps(tasks), "contradicts the plane 'Fetal femur'"
    if case == "nested":
        return "[" * 100_000 + "]" * 100_000, "nested deeper than"
    if case == "forged line":  # a frame id that would print a second error line and recolour the terminal
        tasks[4]["data"]["frame_id"] = "x\nerror: \x1b[31mall good"
        return json.dumps(tasks), "entry 5 (frame x\\nerror: \\x1b[31mall good): frame not in batch"
    return json.dumps(tasks)[:-20], "not valid JSON"


@pytest.mark.parametrize("case", ["unknown class", "not in batch", "conflict", "reviewers disagree",
                                  "brain contradiction", "malformed", "nested", "forged line"])
def test_a_bad_label_studio_export_is_refused_with_one_line_and_nothing_written(archive, batch, tmp_path, case):
    text, needle = _bad_json(batch, archive["truth"], case)
    exported = tmp_path / "export.json"
    exported.write_text(text)
    result = invoke("review", "import", exported, "--batch", batch, "--output", tmp_path / "ds")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith("error: export.json") and needle in line, line
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("case", ["no label column", "short row", "unknown class"])
def test_a_bad_csv_is_refused_with_one_line_and_nothing_written(batch, tmp_path, case):
    lines = (batch / "tasks.csv").read_text().splitlines()
    if case == "no label column":
        lines = [ln.rsplit(",", 2)[0] for ln in lines]
        needle = "missing column(s) label"
    elif case == "short row":
        lines[3] = lines[3].rsplit(",", 2)[0]  # the label cell gone too, not only the optional brain_plane
        needle = "tasks.csv line 4: expected 8 fields, got 6"
    else:
        cells = lines[2].split(",")
        cells[6] = "fetal brain"
        lines[2] = ",".join(cells)
        needle = f"tasks.csv line 3 (frame {cells[0]}): unknown class 'fetal brain'"
    answers = tmp_path / "tasks.csv"
    answers.write_text("\n".join(lines) + "\n")
    result = invoke("review", "import", answers, "--batch", batch, "--output", tmp_path / "ds")
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result)
    assert not (tmp_path / "ds").exists()


def test_import_refuses_a_non_empty_output_and_a_folder_that_is_not_a_batch(archive, batch, tmp_path):
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(simulated_export(batch, archive["truth"])))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    result = invoke("review", "import", exported, "--batch", batch, "--output", tmp_path / "ds")
    assert result.exit_code == 2 and "is not empty" in one_error_line(result)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["keep.txt"]
    result = invoke("review", "import", exported, "--batch", tmp_path, "--output", tmp_path / "ds2")
    assert result.exit_code == 2 and "not a review batch" in one_error_line(result)


def test_a_study_is_on_the_same_side_of_the_split_in_every_batch():
    studies = [f"1.2.3.{i}" for i in range(400)]
    first = pick_test_studies(set(studies[:300]), 0.2, 7, echo=lambda _: None)
    second = pick_test_studies(set(studies[100:]), 0.2, 7, echo=lambda _: None)
    shared = set(studies[100:300])
    assert first & shared == second & shared and 0 < len(first & shared) < len(shared)
    assert 0.1 < len(first) / 300 < 0.3  # about the fraction
    assert pick_test_studies({"a"}, 0.2, 7, echo=lambda _: None) == pick_test_studies({"a", "b"}, 0.2, 7,
                                                                                       echo=lambda _: None) & {"a"}
    warned = []
    pick_test_studies({"prefix:/archive/pngs"}, 0.2, 0, echo=warned.append)
    assert len(warned) == 1 and "1 study answered" in warned[0] and "a split by study needs 5" in warned[0]


def test_an_import_that_cannot_read_a_batch_image_writes_nothing_and_can_be_run_again(archive, batch, tmp_path):
    copy = tmp_path / "project" / "batch"
    shutil.copytree(batch, copy)
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(simulated_export(copy, archive["truth"])))
    image = sorted((copy / "images").iterdir())[-1]
    kept = image.read_bytes()
    image.unlink()
    result = invoke("review", "import", exported, "--batch", copy, "--output", tmp_path / "ds")
    assert result.exit_code == 2 and "have no image in the batch" in one_error_line(result)
    assert not (tmp_path / "ds").exists()
    image.mkdir()  # there, but unreadable: the import fails while it writes
    result = invoke("review", "import", exported, "--batch", copy, "--output", tmp_path / "ds")
    assert result.exit_code != 0 and not (tmp_path / "ds").exists()
    image.rmdir()
    image.write_bytes(kept)
    result = invoke("review", "import", exported, "--batch", copy, "--output", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    assert len(read_fetal_planes(str(tmp_path / "ds")).records) == 11


def test_an_import_to_s3_that_fails_while_writing_leaves_nothing_there(archive, batch, s3_server, tmp_path):
    client = s3_server.client()
    broken = sorted((batch / "images").iterdir())[-1].name
    for path in batch.rglob("*"):
        if path.is_file():
            key = f"review-import/batch/{path.relative_to(batch)}"
            client.put_object(Bucket="test", Key=key + ("/x" if path.name == broken else ""), Body=path.read_bytes())
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(simulated_export(batch, archive["truth"])))
    result = invoke("review", "import", exported, "--batch", "s3://test/review-import/batch",
                    "--output", "s3://test/review-import/ds")
    assert result.exit_code == 2 and "error: not found" in result.output  # a "folder": found, unreadable
    assert client.list_objects_v2(Bucket="test", Prefix="review-import/ds").get("KeyCount") == 0  # no object
    client.delete_object(Bucket="test", Key=f"review-import/batch/images/{broken}/x")
    client.put_object(Bucket="test", Key=f"review-import/batch/images/{broken}",
                      Body=(batch / "images" / broken).read_bytes())
    result = invoke("review", "import", exported, "--batch", "s3://test/review-import/batch",
                    "--output", "s3://test/review-import/ds")
    assert result.exit_code == 0, result.output
    assert client.list_objects_v2(Bucket="test", Prefix="review-import/ds/Images/")["KeyCount"] == 11


# --- phantoms a first model confuses ------------------------------------------------------------

def test_confuse_changes_only_a_share_of_one_class_images(tmp_path):
    plain = synthesize(str(tmp_path / "plain"), per_class=6, seed=2, width=96, height=72)
    mixed = synthesize(str(tmp_path / "mixed"), per_class=6, seed=2, width=96, height=72,
                       confuse=("Fetal thorax", "Fetal abdomen"), confuse_share=0.5)
    assert mixed == plain
    csv_name = "FETAL_PLANES_DB_data.csv"
    assert (tmp_path / "mixed" / csv_name).read_bytes() == (tmp_path / "plain" / csv_name).read_bytes()
    changed = {r.image_name for r in plain if (tmp_path / "plain" / "Images" / f"{r.image_name}.png").read_bytes()
               != (tmp_path / "mixed" / "Images" / f"{r.image_name}.png").read_bytes()}
    thorax = {r.image_name for r in plain if r.plane == "Fetal thorax"}
    assert changed and changed <= thorax and len(changed) < len(thorax)
    with pytest.raises(UserError, match="two different planes"):
        synthesize(str(tmp_path / "bad"), per_class=1, confuse=("Fetal thorax", "Fetal liver"))


def test_a_look_alike_looks_like_its_decoy_more_than_like_its_own_class():
    def render(plane, decoy=None):
        return render_phantom(plane, np.random.default_rng(4), 128, 96, decoy=decoy).astype(np.float32)

    look_alike = render("Fetal thorax", "Fetal abdomen")
    thorax, abdomen = render("Fetal thorax"), render("Fetal abdomen")
    assert np.abs(look_alike - abdomen).mean() < np.abs(look_alike - thorax).mean()
    assert not np.array_equal(look_alike, abdomen)  # a trace of the thorax stays


def test_studies_whose_patient_numbers_collide_land_on_one_side(monkeypatch):
    """The reader refuses a patient on both sides; two study keys sharing a Patient_num (32 bits of
    a hash) must not be split. A study alone keeps the side of its own key."""
    from fpc_ray.review import importer

    studies = {f"1.2.{i}" for i in range(40)}
    monkeypatch.setattr(importer, "patient_num", lambda study: 7 if study in ("1.2.3", "1.2.30") else hash(study))
    for seed in range(20):
        test = pick_test_studies(studies, 0.5, seed, echo=lambda _: None)
        assert ("1.2.3" in test) == ("1.2.30" in test)
        assert all((s in test) == is_test_study(s, 0.5, seed) for s in studies - {"1.2.3", "1.2.30"})

