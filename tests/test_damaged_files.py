"""Every file the tool writes, damaged every way, read by every command that reads it: one
``error:`` line naming the file, exit 2 (a damaged file is not an outage to retry), nothing written.

The artifacts are built once: the session's trained bundle, a pointer to it, a committed labelling
output (two runs committed by :func:`fpc_ray.label.runs.commit`, as ``label`` commits them, with
no index, so ``label`` reads the runs' object lists) and a review batch. Each case damages one
file of a copy and runs one command in-process. ``label`` and ``evaluate`` must fail on the file
before any work starts: labelling is stubbed to fail the test, and ``evaluate``'s data is never
decoded (its data folder is empty).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fpc_ray.cli import app

DEEP = b"[" * 100_000 + b"]" * 100_000


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _with(field: str, value):
    """A JSON document with one top-level ``field`` set to ``value`` (a list: its first item's)."""
    def damage(data: bytes) -> bytes:
        doc = json.loads(data)
        (doc[0] if isinstance(doc, list) else doc)[field] = value
        return json.dumps(doc).encode()
    return damage


def _huge(field: str):
    def damage(data: bytes) -> bytes:
        doc = json.loads(data)
        (doc[0] if isinstance(doc, list) else doc)[field] = 7
        return json.dumps(doc).replace(f'"{field}": 7', f'"{field}": ' + "9" * 5000).encode()
    return damage


def _not_utf8(data: bytes) -> bytes:
    return data.replace(b'"', b'"\xff\xfe', 1)


def _in_footer(data: bytes) -> bytes:
    """Eight bytes of the Parquet footer overwritten; the magic bytes at both ends intact."""
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer
    return data[: start + 4] + b"\xff" * 8 + data[start + 12:]


RANDOM = bytes(range(256)) * 4


def _json_damages(field: str, wrong) -> dict:
    return {"cut": _cut, "empty": lambda d: b"", "{}": lambda d: b"{}", "wrong_type": _with(field, wrong),
            "not_utf8": _not_utf8, "deep": lambda d: DEEP, "huge_int": _huge(field), "random": lambda d: RANDOM}


PARQUET_DAMAGES = {"cut": _cut, "empty": lambda d: b"", "random": lambda d: RANDOM, "flipped": _in_footer}

BUNDLE, POINTER, LABELS, RUN = "bundle", "pointer.json", "labels", "labels/run=r1"
BATCH = "batches/b1"

# file kind: (path in the artifacts, its damages, the commands that read it)
KINDS = {
    "run marker": ("labels/run=r1/_SUCCESS.json", _json_damages("run_id", 7), ["report_run", "trends", "drift"]),
    "model card": ("bundle/model.json", _json_damages("class_names", 5),
                   ["report_bundle", "report_pointer", "evaluate", "label"]),
    "training history": ("bundle/metrics.json", _json_damages("val_top1", "high"), ["report_bundle"]),
    "model pointer": (POINTER, _json_damages("bundle", 5), ["report_pointer", "evaluate_pointer", "label_pointer"]),
    "run part": ("labels/run=r1/part-*.parquet", PARQUET_DAMAGES, ["report_run", "review_export"]),
    "object list": ("labels/run=r1/_objects.parquet", PARQUET_DAMAGES, ["label"]),
    "review manifest": ("batches/b1/manifest.parquet", PARQUET_DAMAGES, ["review_export", "review_import"]),
}


def _commands(case: Path) -> dict[str, list[str]]:
    page = ["--output", str(case / "out" / "page.html")]
    evaluate = ["--data", str(case / "data"), "--output", str(case / "out" / "eval")]
    label = ["--input", str(case / "archive"), "--output", str(case / LABELS)]
    return {
        "report_run": ["report", str(case / RUN), *page],
        "report_bundle": ["report", str(case / BUNDLE), *page],
        "report_pointer": ["report", str(case / POINTER), *page],
        "trends": ["report", str(case / LABELS), *page],
        "drift": ["drift", str(case / LABELS)],
        "evaluate": ["evaluate", "--model", str(case / BUNDLE), *evaluate],
        "evaluate_pointer": ["evaluate", "--model", str(case / POINTER), *evaluate],
        "label": ["label", "--model", str(case / BUNDLE), *label],
        "label_pointer": ["label", "--model", str(case / POINTER), *label],
        "review_export": ["review", "export", str(case / LABELS), "--output", str(case / "batches" / "b2"),
                          "--n", "1"],
        "review_import": ["review", "import", str(case / "answers.json"), "--batch", str(case / BATCH),
                          "--output", str(case / "out" / "dataset")],
    }


def _commit_run(output, run_id: str, names: list[str]) -> None:
    """Commit a run of LABEL_SCHEMA rows for ``names`` as the labeller stages and commits them."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fpc_ray.label import runs
    from fpc_ray.label.schema import LABEL_SCHEMA

    objects = [{"uri": f"s3://archive/{n}", "size": 1, "mtime_ns": 1} for n in names]
    attempt = runs.Attempt(output, run_id, baseline=runs.committed_objects(output)[1])
    attempt.staged.makedirs()
    rows = [{"source_uri": o["uri"], "frame": 0, "label": ("Fetal brain", "Other")[i % 2], "confidence": 0.5 + i / 10,
             "top2_label": "Other", "top2_confidence": 0.2, "content_sha256": f"{i:064x}", "study_uid": "1.2",
             "model_version": "v1", "run_id": run_id, "labelled_at": dt.datetime.now(dt.UTC)}
            for i, o in enumerate(objects)]
    pq.write_table(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), attempt.staged.join("0.parquet").path)
    summary = {"run_id": run_id, "model_version": "v1", "model_uri": "s3://models/b1", "input": "s3://archive",
               "inputs": ["s3://archive"], "output": attempt.run_dir.uri, "options": {},
               "objects": {"listed": len(objects), "skipped": 0, "labelled": len(objects)}, "timings": {}}
    runs.commit(attempt, objects, summary, echo=lambda _: None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, trained_bundle) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fpc_ray.bundle import write_pointer
    from fpc_ray.label.runs import INDEX, STAGING
    from fpc_ray.review.export import MANIFEST_SCHEMA
    from fpc_ray.storage import resolve

    root = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(trained_bundle["bundle"], root / BUNDLE)
    write_pointer(str(root / POINTER), {"bundle": str(root / BUNDLE)})
    labels = resolve(str(root / LABELS))
    _commit_run(labels, "r1", ["a.png", "b.png"])
    _commit_run(labels, "r2", ["c.png", "d.png"])
    (root / LABELS / INDEX).unlink()  # an output from before the index: label reads the object lists
    shutil.rmtree(root / LABELS / STAGING)  # the commits' emptied staging, which label would tidy away
    (root / BATCH).mkdir(parents=True)
    row = {"frame_id": "f" * 16, "source_uri": "s3://archive/a.png", "frame": 0, "content_sha256": "0" * 64,
           "study": "1.2", "label": "Other", "confidence": 0.5, "model_version": "v1", "run_id": "r1"}
    pq.write_table(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA), root / BATCH / "manifest.parquet")
    (root / "answers.json").write_text("[]")
    (root / "archive").mkdir()
    (root / "archive" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "data").mkdir()
    (root / "out").mkdir()
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file's hash. An empty commit lock file may appear (a command that writes takes its
    folder's lock first, and the lock file stays, as labelling's does); it holds nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not (p.name == "_commit.lock" and p.stat().st_size == 0)}


CASES = [pytest.param(kind, damage, reader, id=f"{kind}-{damage}-{reader}".replace(" ", "_"))
         for kind, (_, damages, readers) in KINDS.items() for damage in damages for reader in readers]


@pytest.mark.parametrize(("kind", "damage", "reader"), CASES)
def test_a_damaged_file_is_one_error_line_exit_2_and_nothing_written(artifacts, tmp_path, monkeypatch,
                                                                      kind, damage, reader):
    from fpc_ray.label import pipeline

    monkeypatch.setattr(pipeline, "_label", lambda *a, **k: pytest.fail("labelling started despite a damaged file"))
    case = tmp_path / "case"
    shutil.copytree(artifacts, case)
    from fpc_ray.bundle import write_pointer

    write_pointer(str(case / POINTER), {"bundle": str(case / BUNDLE)})  # the copy's own bundle
    pattern, damages, _ = KINDS[kind]
    (target,) = case.glob(pattern)
    target.write_bytes(damages[damage](target.read_bytes()))
    before = _snapshot(case)

    done = CliRunner().invoke(app, _commands(case)[reader])

    lines = [ln for ln in done.output.splitlines() if ln.strip()]
    assert done.exit_code == 2, done.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], done.output
    assert "Traceback" not in done.output
    assert _snapshot(case) == before
