"""fpc-ray drift: run stats, PSI and chi-square, and ten nightly runs on phantoms whose eighth
night comes from a shifted generator (another gain, speckle and class mix)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.config import DriftConfig
from fpc_ray.drift.assess import ALERT, FIRST, NO_FRAMES, OK, REFERENCE, assess, model_note
from fpc_ray.drift.history import RunRecord, load_history
from fpc_ray.drift.scores import PSI_EPSILON, chi_square, psi
from fpc_ray.label import runs
from fpc_ray.label.run_stats import STATS_COLUMNS, run_stats
from fpc_ray.label.schema import LABEL_SCHEMA, schema_with_metadata
from fpc_ray.storage import resolve
from tests.test_report import chromium  # noqa: F401 - the fixture that installs Chromium

NIGHTS = 10
SHIFTED_FROM = 8
FRAMES_PER_NIGHT = 500  # drawn from the labelled images: PSI's sampling noise stays far below 0.1
IMAGES_PER_PLANE = 12  # labelled once per site: the model's cost of the fixture
SHIFTED_MIX = (0.05, 0.45, 0.05, 0.05, 0.05, 0.35)  # by true plane: a brain-heavy site


# ---------------------------------------------------------------- scores on known values
def test_psi_on_known_values():
    assert psi([50, 50], [50, 50]) == 0.0
    # (0.4 - 0.6) ln(0.4/0.6) + (0.6 - 0.4) ln(0.6/0.4) = 0.4 ln 1.5
    assert psi([60, 40], [40, 60]) == pytest.approx(0.4 * math.log(1.5))
    assert psi([60, 40], [40, 60]) == pytest.approx(psi([40, 60], [60, 40]))  # symmetric
    # A class the reference never saw: its share is floored at PSI_EPSILON, then renormalised.
    ref = np.array([1.0, PSI_EPSILON]) / (1 + PSI_EPSILON)
    cur = np.array([0.5, 0.5])
    assert psi([10, 0], [5, 5]) == pytest.approx(float(np.sum((cur - ref) * np.log(cur / ref))))
    assert psi([10, 0, 0], [5, 5, 0]) == pytest.approx(psi([10, 0], [5, 5]))  # empty on both sides: no term
    with pytest.raises(ValueError, match="different categories"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one observation"):
        psi([0, 0], [1, 2])


def test_chi_square_on_known_values():
    # Pearson's statistic and the chi-square survival function: (60-50)^2/50 * 2 = 4 on 1 dof.
    test = chi_square([1, 1], [60, 40])
    assert (test.statistic, test.dof) == (pytest.approx(4.0), 1)
    assert test.p_value == pytest.approx(0.0455003, rel=1e-5)
    # 2 dof: the survival function is exp(-x/2).
    test = chi_square([1, 1, 1], [10, 20, 30])
    assert test.statistic == pytest.approx(10.0) and test.p_value == pytest.approx(math.exp(-5))
    assert chi_square([3, 3, 3], [20, 20, 20]).p_value == pytest.approx(1.0)
    # Tables of the chi-square distribution, 5 dof: sf(11.0705) = 0.05, sf(20.5150) = 0.001.
    # Six even classes, two moved by d: the statistic is 2 d^2 / 20.
    for statistic, p in ((11.0705, 0.05), (20.5150, 0.001)):
        d = (statistic * 10) ** 0.5
        assert chi_square([1] * 6, [20 + d, 20 - d, 20, 20, 20, 20]).p_value == pytest.approx(p, rel=1e-3)


# ---------------------------------------------------------------- run_stats
def _stats_table(rows: list[dict], class_names=("a", "b", "c")) -> pa.Table:
    schema = pa.schema([LABEL_SCHEMA.field(c) for c in STATS_COLUMNS])
    full = [{c: r.get(c) for c in STATS_COLUMNS} for r in rows]
    return pa.Table.from_pylist(full, schema=schema.with_metadata(
        {"fpc_ray.class_names": json.dumps(list(class_names))}))


def _frame(label, conf, second, probs, width=640, height=480, kind="png") -> dict:
    return {"label": label, "confidence": conf, "top2_confidence": second, "probabilities": probs,
            "width": width, "height": height, "input_kind": kind}


def test_run_stats_counts_every_field():
    table = _stats_table([
        _frame("a", 0.92, 0.05, [0.92, 0.05, 0.03]),
        _frame("a", 0.42, 0.40, [0.42, 0.40, 0.18], width=2400, height=1800, kind="dicom_cine"),
        _frame("b", 0.61, 0.30, [0.09, 0.61, 0.30], width=300, height=200, kind=None),
        {"error": "truncated: stops at byte 10"}, {"error": "truncated: x"}, {"error": "empty: zero bytes"},
    ])
    s = run_stats(table, low_confidence=0.5)
    assert (s["rows"], s["labelled"], s["errors"]) == (6, 3, 3)
    assert s["errors_by_kind"] == {"truncated": 2, "empty": 1}
    assert s["class_names"] == ["a", "b", "c"] and s["by_class"] == {"a": 2, "b": 1, "c": 0}
    conf = s["confidence"]
    assert conf["bins"][0] == 0.0 and conf["bins"][-1] == 1.0 and len(conf["counts"]) == len(conf["bins"]) - 1 == 20
    assert conf["counts"][18] == 1 and conf["counts"][8] == 1 and conf["counts"][12] == 1 and sum(conf["counts"]) == 3
    assert conf["mean"] == pytest.approx((0.92 + 0.42 + 0.61) / 3, abs=1e-6)
    assert s["low_confidence"] == {"threshold": 0.5, "frames": 1, "share": pytest.approx(1 / 3, abs=1e-6)}
    assert s["margin"]["counts"][0] == 1 and s["margin"]["counts"][17] == 1 and s["margin"]["counts"][6] == 1
    assert s["input_kind"] == {"png": 1, "dicom_cine": 1, "unknown": 1}  # nulls are "unknown"
    assert s["frame_size"] == {"<512": 1, "512-1023": 1, ">=2048": 1}
    assert s["mean_probabilities"] == pytest.approx({"a": (0.92 + 0.42 + 0.09) / 3, "b": (0.05 + 0.40 + 0.61) / 3,
                                                     "c": (0.03 + 0.18 + 0.30) / 3}, abs=1e-6)
    json.dumps(s)  # it goes into _SUCCESS.json as it is


def test_run_stats_of_no_rows_and_size_buckets():
    s = run_stats(_stats_table([]), low_confidence=0.5)
    assert (s["rows"], s["labelled"], s["confidence"]["mean"], s["low_confidence"]["share"]) == (0, 0, None, None)
    assert s["by_class"] == {"a": 0, "b": 0, "c": 0} and s["mean_probabilities"] is None
    edges = [(511, 10), (10, 512), (2047, 1), (1, 2048), (4096, 4096), (None, 100)]
    sized = run_stats(_stats_table([_frame("a", 0.9, 0.1, [0.9, 0.1, 0.0], w, h) for w, h in edges]), 0.5)
    assert sized["frame_size"] == {"<512": 1, "512-1023": 1, "1024-2047": 1, ">=2048": 2, "unknown": 1}


# ---------------------------------------------------------------- assessing synthetic histories
def _record(run_id: str, by_class: dict, model="m1", conf_counts=None) -> RunRecord:
    counts = conf_counts or [0] * 18 + [10, sum(by_class.values()) - 10]
    n = sum(by_class.values())
    stats = {"version": 1, "rows": n, "labelled": n, "errors": 0, "errors_by_kind": {}, "class_names": ["a", "b"],
             "by_class": by_class, "confidence": {"bins": [], "counts": counts, "mean": 0.9 if n else None},
             "low_confidence": {"threshold": 0.5, "frames": 0, "share": 0.0 if n else None},
             "input_kind": {"png": n} if n else {}}
    return RunRecord(run_id, f"2026-11-{run_id[-2:]}T03:00:00+00:00", model, stats, "recorded", None)


def test_first_run_has_no_reference_and_a_fixed_reference_is_used_for_every_run():
    history = [_record("n01", {"a": 500, "b": 500}), _record("n02", {"a": 510, "b": 490}),
               _record("n03", {"a": 900, "b": 100})]
    cfg = DriftConfig()
    window = assess(history, cfg)
    assert [a.level for a in window] == [FIRST, OK, ALERT]
    assert window[2].scores["class_psi"] > cfg.psi_alert and "class-mix PSI" in window[2].reasons[0]
    assert "a 0.51 -> 0.90, b 0.49 -> 0.10" in window[2].reasons[0]  # against n01 and n02 pooled
    fixed = assess(history, cfg, reference_run="n03")
    assert [a.level for a in fixed] == [ALERT, ALERT, REFERENCE]
    assert [r.run_id for r in fixed[0].reference] == ["n03"]
    assert [r.run_id for r in assess(history, cfg, window=1)[2].reference] == ["n02"]
    from fpc_ray.errors import UserError

    with pytest.raises(UserError, match="--reference n09: no such committed run"):
        assess(history, cfg, reference_run="n09")


def test_a_run_without_frames_is_not_scored_nor_a_reference():
    history = [_record("n01", {"a": 500, "b": 500}), _record("n02", {}), _record("n03", {"a": 500, "b": 500})]
    levels = assess(history, DriftConfig())
    assert [a.level for a in levels] == [FIRST, NO_FRAMES, OK]
    assert [r.run_id for r in levels[2].reference] == ["n01"]


def test_a_model_change_is_named_where_it_happened():
    history = [_record("n01", {"a": 500, "b": 500}), _record("n02", {"a": 500, "b": 500}),
               _record("n03", {"a": 800, "b": 200}, model="m2"), _record("n04", {"a": 800, "b": 200}, model="m2")]
    out = assess(history, DriftConfig())
    assert out[2].model_note == "model changed m1 -> m2 at this run"
    assert out[3].model_note == "model changed m1 -> m2 at run n03"  # the reference still holds m1 runs
    assert model_note(history[1], history, history[:1]) is None
    from fpc_ray.drift.assess import alert_line

    assert alert_line(out[2]).startswith("drift: run n03 alert: class-mix PSI ")
    assert alert_line(out[2]).endswith("; model changed m1 -> m2 at this run")


def test_chi_square_alerts_only_when_the_move_is_not_negligible():
    cfg = DriftConfig(psi_alert=10.0)  # PSI alone never alerts here
    big = [_record("n01", {"a": 50_000, "b": 50_000}), _record("n02", {"a": 51_000, "b": 49_000})]
    small_move = assess(big, cfg)[1]
    assert small_move.scores["chi2_p"] < cfg.chi2_p_alert and small_move.level == OK  # significant, negligible
    moved = [_record("n01", {"a": 500, "b": 500}), _record("n02", {"a": 660, "b": 340})]
    a = assess(moved, cfg)[1]
    assert a.scores["class_psi"] >= cfg.psi_warn and a.scores["chi2_p"] < cfg.chi2_p_alert and a.level == ALERT
    few = [_record("n01", {"a": 50, "b": 50}), _record("n02", {"a": 20, "b": 60})]
    assert assess(few, DriftConfig(chi2_min_frames=100, psi_alert=10.0))[1].scores["chi2_p"] is None


# ---------------------------------------------------------------- ten nights on phantoms
def _shift(image: Path, out: Path, rng: np.random.Generator) -> Path:
    """The other site's machine: more gain and multiplicative speckle, exported as JPEG."""
    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.float64)
    speckle = rng.gamma(shape=4.0, scale=1 / 4.0, size=pixels.shape)
    shifted = np.clip(pixels * 1.6 * speckle + 25, 0, 255).astype(np.uint8)
    target = out / (image.stem + ".jpg")
    Image.fromarray(shifted).save(target, quality=85)
    return target


def _labelled(predictor, paths: list[Path], kind: str) -> pa.Table:
    """The model's rows for ``paths``, with their true plane; ``input_kind`` where the predictor
    leaves it unset is what the file is (the predictor fills it in once it knows)."""
    table = predictor({"uri": np.array([str(p) for p in paths], dtype=object)})
    assert table["error"].null_count == table.num_rows, table["error"].drop_null().to_pylist()[:3]
    kinds = pc.coalesce(table["input_kind"], pa.scalar(kind))
    table = table.set_column(table.schema.get_field_index("input_kind"), "input_kind", kinds)
    return table.append_column("plane", pa.array([int(p.stem.split("_Plane")[1][0]) - 1 for p in paths]))


def _night(pool: pa.Table, night: int, weights, rng: np.random.Generator) -> pa.Table:
    """FRAMES_PER_NIGHT rows drawn from ``pool`` with these weights per true plane, each a new object."""
    plane = pool["plane"].to_numpy()
    p = np.array([weights[k] for k in plane], dtype=np.float64)
    rows = pool.take(rng.choice(pool.num_rows, size=FRAMES_PER_NIGHT, p=p / p.sum())).drop_columns(["plane"])
    uris = [f"s3://archive/2026/11/{night:02d}/img-{i:04d}{Path(u).suffix}"
            for i, u in enumerate(rows["source_uri"].to_pylist())]
    rows = rows.set_column(0, "source_uri", pa.array(uris, pa.string()))
    return rows.set_column(rows.schema.get_field_index("run_id"), "run_id",
                           pa.array([f"nightly-2026-11-{night:02d}"] * rows.num_rows, pa.string()))


def commit_rows(output, run_id: str, table: pa.Table, card: dict) -> dict:
    """Stage ``table`` as one part and commit it the way a labelling run does."""
    _, baseline = runs.committed_objects(output)
    attempt = runs.Attempt(output, run_id, baseline=baseline)
    attempt.staged.makedirs()
    pq.write_table(table.cast(schema_with_metadata(card)), attempt.staged.join("part-0.parquet").path,
                   filesystem=attempt.staged.fs)
    objects = [{"uri": u, "size": 1, "mtime_ns": 1} for u in sorted(set(table["source_uri"].to_pylist()))]
    summary = {"run_id": run_id, "model_version": card["version"], "model_uri": "phantom-bundle",
               "input": "s3://archive/", "objects": {"listed": len(objects), "skipped": 0, "labelled": len(objects)},
               "timings": {}}
    return runs.commit(attempt, objects, summary, echo=lambda s: None)


@pytest.fixture(scope="module")
def nights(trained_bundle, tmp_path_factory) -> dict:
    """Ten committed nightly runs labelled by the session's phantom model, in-process: nights 1-7
    draw the training site's PNGs evenly over the planes, nights 8-10 the shifted site's JPEGs
    (gain and speckle) with a brain-heavy mix. ``{"output", "card", "ids"}``."""
    from fpc_ray.bundle import read_card
    from fpc_ray.label.predictor import Predictor

    root = tmp_path_factory.mktemp("nights")
    card = read_card(trained_bundle["bundle"])
    every = sorted((Path(trained_bundle["data"]) / "Images").glob("*.png"))
    images = [p for k in range(1, 7) for p in [q for q in every if f"_Plane{k}_" in q.name][:IMAGES_PER_PLANE]]
    rng = np.random.default_rng(8)
    (root / "shifted").mkdir()
    shifted = [_shift(p, root / "shifted", rng) for p in images]
    predictor = Predictor(trained_bundle["bundle"], None, "none", False, "phantom", decode_threads=2)
    base, other = _labelled(predictor, images, "png"), _labelled(predictor, shifted, "jpeg")
    output = resolve(str(root / "labels"))
    ids = []
    for night in range(1, NIGHTS + 1):
        pool, weights = (base, (1,) * 6) if night < SHIFTED_FROM else (other, SHIFTED_MIX)
        ids.append(f"nightly-2026-11-{night:02d}")
        commit_rows(output, ids[-1], _night(pool, night, weights, np.random.default_rng(night)), card)
    return {"output": root / "labels", "card": card, "ids": ids}


def _drift(*args: str):
    return CliRunner().invoke(app, ["drift", *args])


def test_drift_flags_the_eighth_night_and_none_before(nights):
    done = _drift(str(nights["output"]), "--json")
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    levels = {r["run_id"]: r["level"] for r in out["runs"]}
    ids = nights["ids"]
    assert levels[ids[0]] == FIRST
    assert all(levels[i] != ALERT for i in ids[1:SHIFTED_FROM - 1]), levels
    night8 = out["runs"][SHIFTED_FROM - 1]
    assert night8["level"] == ALERT and night8["reference"] == ids[2:7], night8
    assert night8["scores"]["class_psi"] >= 0.25 or night8["scores"]["confidence_psi"] >= 0.25
    assert night8["input_kind_mix"] == {"jpeg": 1.0} and out["runs"][0]["input_kind_mix"] == {"png": 1.0}
    assert all(r["stats"] == "recorded" and not r["model_changed"] for r in out["runs"])
    assert out["thresholds"]["psi_alert"] == 0.25 and out["reference"] == {"window": 5}

    table = _drift(str(nights["output"]), "--last", "4")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "stats"]
    assert [line.split()[0] for line in lines[1:5]] == ids[-4:] and not lines[5].startswith("nightly-")
    assert any(line.startswith(ids[SHIFTED_FROM - 1]) and "ALERT" in line for line in lines)


def test_fail_on_drift_exits_3_with_one_line(nights):
    ids = nights["ids"]
    done = _drift(str(nights["output"]), "--fail-on-drift", "--reference", ids[0])
    assert done.exit_code == 3, done.output
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"drift: run {ids[-1]} alert: ")
    assert "PSI" in line and "(alert 0.25)" in line


def test_fail_on_drift_passes_a_quiet_newest_night(nights, tmp_path):
    import shutil

    for run_id in nights["ids"][:SHIFTED_FROM - 1]:
        shutil.copytree(nights["output"] / f"run={run_id}", tmp_path / f"run={run_id}")
    done = _drift(str(tmp_path), "--fail-on-drift")
    assert done.exit_code == 0 and done.stderr == "", done.output


def test_nightly_job_drift_option_is_the_same_check(nights, capsys):
    """jobs/nightly_label.py --drift on a night already committed (a retry of the job): the
    drift check of that night, exit 3 and its line when it drifted, 0 when it did not."""
    from tests.test_label import _nightly_job

    job = _nightly_job()
    args = ["--model", "unused", "--archive", "unused", "--output", str(nights["output"]), "--drift"]
    assert job.main([*args, "--date", "2026-11-10"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("nothing to do") and len(lines) == 2
    assert lines[1].startswith(f"drift: run {nights['ids'][-1]} alert: ")
    assert job.main([*args, "--date", "2026-11-07"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"drift: run {nights['ids'][6]} ok: ")


def test_drift_errors_are_one_line(nights, tmp_path):
    for args, message in (([str(tmp_path / "none")], "no such prefix"),
                          ([str(tmp_path)], "no committed run"),
                          ([str(nights["output"]), "--reference", "nightly-1999-01-01"], "no such committed run"),
                          ([str(nights["output"]), "--reference", nights["ids"][0], "--reference-window", "3"],
                           "give one of them")):
        done = _drift(*args)
        assert done.exit_code == 2 and done.output.count("\n") == 1 and message in done.output, done.output


def write_old_run(output: Path, run_id: str, labels: list[str], committed_at: str | None = None) -> None:
    """A run as committed before this change: no input_kind column, _SUCCESS.json without stats."""
    import datetime as dt

    old_schema = pa.schema([f for f in LABEL_SCHEMA if f.name != "input_kind"])
    now = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    rows = [{"source_uri": f"s3://archive/old/{i}.png", "frame": 0, "label": label, "confidence": 0.95,
             "top2_confidence": 0.03, "probabilities": [0.95, 0.05], "width": 800, "height": 600,
             "model_version": "m0", "run_id": run_id, "labelled_at": now} for i, label in enumerate(labels)]
    run = output / f"run={run_id}"
    run.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=old_schema.with_metadata(
        {"fpc_ray.class_names": json.dumps(["Fetal brain", "Other"])})), run / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([{"uri": r["source_uri"], "size": 1, "mtime_ns": 1} for r in rows],
                                        schema=runs.OBJECTS_SCHEMA), run / runs.OBJECTS)
    summary = {"run_id": run_id, "model_version": "m0", "model_uri": "s3://models/m0", "input": "s3://archive/old/",
               "objects": {"listed": len(rows), "skipped": 0, "labelled": len(rows)}, "rows": len(rows),
               "labelled": len(rows), "errors": 0, "errors_by_kind": {}, "by_class": {}, "timings": {}}
    if committed_at:
        summary["committed_at"] = committed_at
    (run / runs.SUCCESS).write_text(json.dumps(summary))


def test_runs_committed_before_stats_are_computed_not_missing(tmp_path):
    write_old_run(tmp_path, "r1", ["Fetal brain"] * 60 + ["Other"] * 40)
    write_old_run(tmp_path, "r2", ["Fetal brain"] * 58 + ["Other"] * 42)
    history = load_history(resolve(str(tmp_path)), DriftConfig().low_confidence)
    assert [(r.run_id, r.source) for r in history] == [("r1", "computed"), ("r2", "computed")]
    assert history[0].stats["input_kind"] == {"unknown": 100} and history[0].stats["by_class"]["Other"] == 40
    done = _drift(str(tmp_path), "--json")
    assert done.exit_code == 0, done.output
    runs_out = json.loads(done.stdout)["runs"]
    assert [r["stats"] for r in runs_out] == ["computed", "computed"] and runs_out[1]["level"] == OK
    # The old run's other readers: the run report, the index and the objects of committed runs.
    table, committed = runs.committed_objects(resolve(str(tmp_path)))
    assert committed == {"r1", "r2"} and table.num_rows == 200
    page = tmp_path / "r1.html"
    report = CliRunner().invoke(app, ["report", str(tmp_path / "run=r1"), "--output", str(page)])
    assert report.exit_code == 0, report.output


def test_a_new_commit_beside_old_runs_records_stats(tmp_path, monkeypatch):
    write_old_run(tmp_path, "r1", ["Fetal brain"] * 10)
    card = {"version": "m1", "class_names": ["Fetal brain", "Other"]}
    base = {n: None for n in LABEL_SCHEMA.names}
    rows = [base | {"source_uri": f"s3://archive/new/{i}.dcm", "frame": 0, "label": "Other", "confidence": 0.4,
                    "top2_confidence": 0.35, "probabilities": [0.35, 0.4], "width": 1200, "height": 900,
                    "input_kind": "dicom", "model_version": "m1", "run_id": "r2"} for i in range(4)]
    rows.append(base | {"source_uri": "s3://archive/new/bad.dcm", "frame": 0, "error": "no_pixels: no PixelData",
                        "run_id": "r2"})
    summary = commit_rows(resolve(str(tmp_path)), "r2", pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), card)
    stats = summary["stats"]
    assert (summary["rows"], summary["labelled"], summary["errors"]) == (5, 4, 1)
    assert summary["by_class"] == {"Other": 4} and summary["errors_by_kind"] == {"no_pixels": 1}
    assert stats["input_kind"] == {"dicom": 4} and stats["frame_size"] == {"1024-2047": 4}
    assert stats["low_confidence"]["share"] == 1.0 and stats["class_names"] == ["Fetal brain", "Other"]
    on_disk = json.loads((tmp_path / "run=r2" / runs.SUCCESS).read_text())
    assert on_disk["stats"] == stats
    history = load_history(resolve(str(tmp_path)), DriftConfig().low_confidence)
    assert [(r.run_id, r.source) for r in history] == [("r1", "computed"), ("r2", "recorded")]
    # Another threshold than the one recorded: computed again from the Parquet, never misread.
    other = load_history(resolve(str(tmp_path)), 0.3)
    assert other[1].source == "computed" and other[1].stats["low_confidence"]["share"] == 0.0


def test_trends_page_shows_the_alert_and_renders(nights, chromium, tmp_path):  # noqa: F811 - the fixture
    from tests.test_report import _embedded_pngs, _render

    out = tmp_path / "trends.html"
    done = CliRunner().invoke(app, ["report", str(nights["output"]), "--output", str(out)])
    assert done.exit_code == 0 and "wrote the trends report" in done.output, done.output
    page = out.read_text()
    for title in ("Newest run", "Class mix", "Confidence", "Errors", "Drift scores", "Runs"):
        assert f"<h2>{title}</h2>" in page, title
    # The alert as text: the newest night's line, and night 8 among the flagged runs.
    assert "ALERT" in page and f"drift: run {nights['ids'][-1]} alert: " in page
    assert f"<tr><td>{nights['ids'][SHIFTED_FROM - 1]}</td><td>alert</td>" in page
    pngs = _embedded_pngs(page)
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "<script" not in page and "http" not in page.split("</style>", 1)[1].split("fpc-ray ", 1)[0]
    shot = _render(chromium, out, tmp_path)
    with Image.open(shot) as im:  # a painted page, not a blank one
        assert len(set(im.convert("L").resize((64, 120)).getdata())) > 20
