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
from fpc_ray.drift.assess import ALERT, FIRST, NO_FRAMES, OK, REFERENCE, TOO_FEW, WARN, alert_line, assess, model_note
from fpc_ray.drift.history import RunRecord, load_history
from fpc_ray.drift.scores import SMOOTHING, chi_square, psi
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
    # Half a frame added to each count: shares 60.5/101 and 40.5/101, swapped; PSI = 2 d ln(hi/lo).
    assert SMOOTHING == 0.5
    assert psi([60, 40], [40, 60]) == pytest.approx(2 * (20 / 101) * math.log(60.5 / 40.5))
    assert psi([60, 40], [40, 60]) == pytest.approx(psi([40, 60], [60, 40]))  # symmetric
    # A class the reference never saw: 0.5 of 11 against 5.5 of 11.
    ref, cur = np.array([10.5, 0.5]) / 11, np.array([5.5, 5.5]) / 11
    assert psi([10, 0], [5, 5]) == pytest.approx(float(np.sum((cur - ref) * np.log(cur / ref))))
    assert psi([10, 0, 0], [5, 5, 0]) == pytest.approx(psi([10, 0], [5, 5]))  # empty on both sides: no term
    with pytest.raises(ValueError, match="different categories"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one observation"):
        psi([0, 0], [1, 2])


def test_chi_square_on_known_values():
    # Homogeneity of [[10, 20], [20, 10]]: every expected count 15, statistic 4 * 25 / 15 on 1 dof.
    test = chi_square([10, 20], [20, 10])
    assert (test.statistic, test.dof) == (pytest.approx(20 / 3), 1)
    assert test.p_value == pytest.approx(0.0098232, rel=1e-4)
    # A reference far larger than the run: the goodness-of-fit values against its shares,
    # (60-50)^2/50 * 2 = 4 on 1 dof, and on 2 dof a survival function of exp(-x/2).
    huge = 10**9
    test = chi_square([huge, huge], [60, 40])
    assert (test.statistic, test.dof) == (pytest.approx(4.0, rel=1e-6), 1)
    assert test.p_value == pytest.approx(0.0455003, rel=1e-5)
    test = chi_square([huge] * 3, [10, 20, 30])
    assert test.statistic == pytest.approx(10.0, rel=1e-6) and test.p_value == pytest.approx(math.exp(-5), rel=1e-5)
    assert chi_square([3, 3, 3], [20, 20, 20]).p_value == pytest.approx(1.0)
    assert tuple(vars(chi_square([5, 0], [7, 0])).values()) == (0.0, 0, 1.0)  # one category: nothing to test
    # Tables of the chi-square distribution, 5 dof: sf(11.0705) = 0.05, sf(20.5150) = 0.001.
    # Six even classes, two moved by d: the statistic is 2 d^2 / 20.
    for statistic, p in ((11.0705, 0.05), (20.5150, 0.001)):
        d = (statistic * 10) ** 0.5
        assert chi_square([huge] * 6, [20 + d, 20 - d, 20, 20, 20, 20]).p_value == pytest.approx(p, rel=1e-3)


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
    n = sum(by_class.values())
    counts = conf_counts or [0] * 18 + [min(n, 10), n - min(n, 10)]
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
    # The promotion's first run has only m1 runs before it: compared across models, never an alert.
    assert [r.run_id for r in out[2].reference] == ["n01", "n02"] and out[2].scores["class_psi"] >= 0.25
    assert out[2].level == WARN
    assert out[2].model_note == "model changed m1 -> m2 at this run: compared across models, not alerting"
    assert alert_line(out[2]).startswith("drift: run n03 warn: class-mix PSI ")
    assert alert_line(out[2]).endswith("; model changed m1 -> m2 at this run: compared across models, not alerting")
    # The next m2 run is compared with the m2 run before it, not with the m1 runs in its window.
    assert [r.run_id for r in out[3].reference] == ["n03"] and out[3].level == OK and out[3].model_note is None
    assert model_note(history[1], history, history[:1]) is None
    # A fixed reference of another model is capped the same way.
    fixed = assess(history, DriftConfig(), reference_run="n01")
    assert fixed[3].level == WARN and fixed[3].model_note.startswith("model changed m1 -> m2 at run n03: ")


def test_a_model_change_compares_with_runs_of_the_same_model():
    """m2 is promoted, then rolled back to m1: each run's reference is the runs of its own model,
    also where other models' runs sit in between; only a model's first run crosses models."""
    even, moved = {"a": 500, "b": 500}, {"a": 800, "b": 200}
    history = [_record("n01", even), _record("n02", even), _record("n03", moved, model="m2"),
               _record("n04", moved, model="m2"), _record("n05", even), _record("n06", moved, model="m2")]
    out = assess(history, DriftConfig(reference_window=5))
    assert [[r.run_id for r in a.reference] for a in out[1:]] == [["n01"], ["n01", "n02"], ["n03"], ["n01", "n02"],
                                                                 ["n03", "n04"]]
    assert [a.level for a in out] == [FIRST, OK, WARN, OK, OK, OK]
    assert [a.model_note is not None for a in out] == [False, False, True, False, False, False]


def test_chi_square_alerts_only_when_the_move_is_not_negligible():
    cfg = DriftConfig(psi_alert=10.0)  # PSI alone never alerts here
    big = [_record("n01", {"a": 50_000, "b": 50_000}), _record("n02", {"a": 51_000, "b": 49_000})]
    small_move = assess(big, cfg)[1]
    assert small_move.scores["chi2_p"] < cfg.chi2_p_alert and small_move.level == OK  # significant, negligible
    moved = [_record("n01", {"a": 500, "b": 500}), _record("n02", {"a": 660, "b": 340})]
    a = assess(moved, cfg)[1]
    assert a.scores["class_psi"] >= cfg.psi_warn and a.scores["chi2_p"] < cfg.chi2_p_alert and a.level == ALERT
    few = [_record("n01", {"a": 50, "b": 50}), _record("n02", {"a": 20, "b": 60})]
    assert assess(few, DriftConfig(chi2_min_frames=100, min_frames=50, psi_alert=10.0))[1].scores["chi2_p"] is None


def _sampled(run_id: str, rng: np.random.Generator, frames: int) -> RunRecord:
    """A run of ``frames`` frames drawn from one fixed distribution: a six-class mix and a model's
    confidence histogram (most frames confident, a long thin tail over the 20 bins)."""
    mix = np.array([0.3, 0.25, 0.15, 0.12, 0.1, 0.08])
    conf = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 0, 3, 0, 0, 0, 0, 4, 2, 23], dtype=np.float64)
    by_class = dict(zip("abcdef", rng.multinomial(frames, mix).tolist(), strict=True))
    record = _record(run_id, by_class, conf_counts=rng.multinomial(frames, conf / conf.sum()).tolist())
    record.stats["class_names"] = list("abcdef")
    return record


def test_small_runs_of_one_distribution_never_alert():
    """Two samples of one distribution, 1000 times over: at 150 frames each they are "too few
    frames", never scored (sampling noise alone takes PSI past 0.25 about one time in 200 there);
    at 200 frames, the fewest the default scores, alerts stay at the rate the chi-square rule is
    designed for (p < 0.001, with the class-mix PSI at least psi_warn): at most 5 in 1000. With
    a floor on the shares and a goodness-of-fit test instead, 7 % of the 200-frame pairs and 13 %
    of the 150-frame pairs were alerts."""
    rng = np.random.default_rng(15)
    cfg = DriftConfig()
    levels = {OK: 0, WARN: 0, ALERT: 0}
    for _ in range(1000):
        assert assess([_sampled("n01", rng, 150), _sampled("n02", rng, 150)], cfg)[1].level == TOO_FEW
        levels[assess([_sampled("n01", rng, 200), _sampled("n02", rng, 200)], cfg)[1].level] += 1
    assert cfg.min_frames == 200 and levels[ALERT] <= 5 and levels[OK] > 3 * levels[WARN], levels


def test_too_few_frames_in_the_run_or_the_reference_is_its_own_level():
    cfg = DriftConfig()  # min_frames 200
    one = [_record("n01", {"a": 500, "b": 500}), _record("n02", {"a": 0, "b": 1}, conf_counts=[1] + [0] * 19)]
    out = assess(one, cfg)[1]
    assert out.level == TOO_FEW and out.scores == {"error_rate": 0.0, "reference_error_rate": 0.0,
                                                   "error_p": 1.0}
    assert alert_line(out) == ("drift: run n02: too few frames (1 labelled frames, 1000 in the reference: drift "
                               "scores need 200 in each), nothing to compare")
    small_reference = [_record("n01", {"a": 60, "b": 40}), _record("n02", {"a": 100, "b": 900})]
    assert assess(small_reference, cfg)[1].level == TOO_FEW
    # Pooled, the window's small runs make a reference: each run of 120 is too few, 240 are enough.
    pooled = [_record(f"n0{k}", {"a": 60, "b": 60}) for k in (1, 2)] + [_record("n03", {"a": 900, "b": 100})]
    assert [a.level for a in assess(pooled, cfg)] == [FIRST, TOO_FEW, ALERT]


def _failing(run_id: str, errors: int, labelled: int, **kinds) -> RunRecord:
    record = _record(run_id, {"a": labelled // 2, "b": labelled - labelled // 2})
    record.stats |= {"rows": labelled + errors, "errors": errors, "errors_by_kind": kinds}
    return record


def test_an_error_rate_jump_is_an_alert_even_without_frames():
    history = [_failing("n01", 10, 990, truncated=10), _failing("n02", 12, 988, truncated=12),
               _failing("n03", 500, 0, decode=480, truncated=15, empty=5)]
    out = assess(history, DriftConfig())
    assert out[1].level == OK and out[1].scores["error_rate"] == pytest.approx(0.012)
    night = out[2]
    assert night.level == ALERT and night.scores["error_rate"] == 1.0 and night.scores["error_p"] < 1e-300
    assert alert_line(night) == ("drift: run n03 alert: error rate 100.0% (reference 1.1%, alert +20%): "
                                 "decode 480, truncated 15, empty 5")
    # A rise under error_rate_alert, or one too small to be more than chance, is no alert.
    assert assess(history, DriftConfig(error_rate_alert=1.0))[2].level == NO_FRAMES
    tiny = [_failing("n01", 50, 950), _failing("n02", 1, 1)]  # a 5 % reference: 1 of 2 failing is chance
    chance = assess(tiny, DriftConfig())[1]
    assert chance.scores["error_rate"] == 0.5 and chance.level == TOO_FEW
    # Also on a scored run, and also across a model change (errors are not the model's).
    promoted = [_failing("n01", 10, 990), _failing("n02", 400, 600, decode=400)]
    promoted[1].model_version = "m2"
    assert assess(promoted, DriftConfig())[1].level == ALERT


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


def test_nightly_job_drift_thresholds_come_from_config_and_set(nights, capsys, tmp_path):
    """The job's --config FILE and repeatable --set reach its --drift check; a bad value is one
    line and exit 2 before anything is labelled."""
    from tests.test_label import _nightly_job

    job = _nightly_job()
    args = ["--model", "unused", "--archive", "unused", "--output", str(nights["output"]), "--drift",
            "--date", "2026-11-10"]
    config = tmp_path / "drift.yaml"
    config.write_text("drift:\n  psi_warn: 50\n  psi_alert: 100\n")
    assert job.main([*args, "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"drift: run {nights['ids'][-1]} ok: ")
    assert job.main([*args, "--set", "drift.psi_warn=0.2", "--set", "drift.psi_alert=100",
                     "--set", "drift.chi2_p_alert=1e-300"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"drift: run {nights['ids'][-1]} warn: ")
    assert job.main([*args, "--config", str(config), "--set", "drift.psi_alert=0.25"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "psi_warn (50.0) must not exceed psi_alert (0.25)" in err, err


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
    write_old_run(tmp_path, "r1", ["Fetal brain"] * 150 + ["Other"] * 100)
    write_old_run(tmp_path, "r2", ["Fetal brain"] * 145 + ["Other"] * 105)
    history = load_history(resolve(str(tmp_path)), DriftConfig().low_confidence)
    assert [(r.run_id, r.source) for r in history] == [("r1", "computed"), ("r2", "computed")]
    assert history[0].stats["input_kind"] == {"unknown": 250} and history[0].stats["by_class"]["Other"] == 100
    done = _drift(str(tmp_path), "--json")
    assert done.exit_code == 0, done.output
    runs_out = json.loads(done.stdout)["runs"]
    assert [r["stats"] for r in runs_out] == ["computed", "computed"] and runs_out[1]["level"] == OK
    # The old run's other readers: the run report, the index and the objects of committed runs.
    table, committed = runs.committed_objects(resolve(str(tmp_path)))
    assert committed == {"r1", "r2"} and table.num_rows == 500
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
    # Another threshold than the one recorded: the low-confidence share is counted again from the
    # confidence column, the other stats stay as recorded; never misread.
    other = load_history(resolve(str(tmp_path)), 0.3)
    assert other[1].source == "recorded" and other[1].stats["low_confidence"] == {
        "threshold": 0.3, "frames": 0, "share": 0.0}
    assert other[1].stats | {"low_confidence": stats["low_confidence"]} == stats
    assert load_history(resolve(str(tmp_path)), 0.41)[1].stats["low_confidence"]["frames"] == 4


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
