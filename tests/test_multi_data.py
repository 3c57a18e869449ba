"""Several datasets as one: each split by its own patients, then joined; one-line refusals; the
CLI's repeatable --data; evaluation overall and per dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.config import load_config
from fpc_ray.data.fetal_planes import CSV_NAME, read_fetal_planes
from fpc_ray.data.ingest import split_rows
from fpc_ray.data.multi import SPLITS, joined_fingerprint, read_datasets
from fpc_ray.data.synth import synthesize
from fpc_ray.errors import UserError
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.train.driver import prepare_data

runner = CliRunner()


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> str:
    """A second small phantom dataset (its patient numbers overlap the first's)."""
    out = tmp_path_factory.mktemp("second")
    synthesize(str(out), per_class=8, seed=9, width=128, height=96)
    return str(out)


def _patients(records) -> set[int]:
    return {r.patient for r in records}


def test_each_dataset_is_split_by_its_own_patients_then_joined(phantom_dir, second_dataset):
    cfg = load_config(None, ["data.image_size=32", "data.decode_threads=2"])
    parts = read_datasets([phantom_dir, second_dataset], cfg.data.val_fraction, cfg.data.split_seed)
    first, second = (read_fetal_planes(uri) for uri in (phantom_dir, second_dataset))
    # Patient numbers are per dataset: the same numbers appear in both.
    assert _patients(first.records) & _patients(second.records)
    for part, db in zip(parts, (first, second), strict=True):
        for name in SPLITS:  # exactly the split the dataset alone gets (and `evaluate --data B` cuts)
            assert part.splits[name] == db.split(name, cfg.data.val_fraction, cfg.data.split_seed)
        train, val, test = (_patients(part.splits[n]) for n in SPLITS)
        assert not (train & val or train & test or val & test)
        assert part.card_entry() == {"uri": part.uri, "fingerprint": db.fingerprint,
                                     "splits": {n: len(part.splits[n]) for n in SPLITS}}

    prepared = prepare_data(cfg, [phantom_dir, second_dataset])
    assert prepared.data_uris == [phantom_dir, second_dataset]
    assert prepared.ingest == "arrays" and prepared.datasets is None  # auto, on a few kB: decoded here
    for name in SPLITS:  # train with train, val with val, test with test, in the order given
        records = parts[0].splits[name] + parts[1].splits[name]
        arrays = prepared.arrays[name]
        assert len(arrays) == len(records) and arrays.images.shape[1:] == (32, 32)
        np.testing.assert_array_equal(arrays.labels, [r.label for r in records])
        np.testing.assert_array_equal(prepared.labels[name], arrays.labels)
    # The rows that Ray Data decodes when the data do not fit the driver: the same order, each row
    # naming its dataset's root.
    for name in SPLITS:
        records = parts[0].splits[name] + parts[1].splits[name]
        rows = split_rows(parts, name)
        assert [(r["index"], r["name"], r["label"], r["patient"]) for r in rows] == [
            (i, rec.image_name, rec.label, rec.patient) for i, rec in enumerate(records)]
        sizes = [len(p.splits[name]) for p in parts]
        assert [(r["root"], r["dataset"]) for r in rows] == [(parts[0].db.root.uri, 0)] * sizes[0] + [
            (parts[1].db.root.uri, 1)] * sizes[1]
    # One dataset: exactly as before.
    alone = prepare_data(cfg, phantom_dir)
    assert [len(alone.arrays[n]) for n in SPLITS] == [len(parts[0].splits[n]) for n in SPLITS]


def test_a_dataset_with_other_classes_is_refused_in_one_line(phantom_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(phantom_dir, other)
    csv = other / CSV_NAME
    csv.write_text(csv.read_text().replace(";Fetal femur;", ";Fetal heart;"))
    with pytest.raises(UserError, match=rf"{CSV_NAME} line \d+: unknown Plane 'Fetal heart' \(expected one of "
                                        r"Fetal abdomen, .*\)") as caught:
        read_datasets([phantom_dir, str(other)], 0.15, 0)
    assert str(other) in str(caught.value) and "\n" not in str(caught.value)


def test_a_dataset_given_twice_is_refused(phantom_dir):
    with pytest.raises(UserError, match="given twice"):
        read_datasets([phantom_dir, phantom_dir + "/"], 0.15, 0)


def test_the_joined_fingerprint_is_the_one_dataset_s_or_changes_with_any():
    assert joined_fingerprint(["a" * 64]) == "a" * 64
    both = joined_fingerprint(["a" * 64, "b" * 64])
    assert len(both) == 64 and both not in (joined_fingerprint(["b" * 64, "a" * 64]),
                                           joined_fingerprint(["a" * 64, "c" * 64]))


def test_evaluate_scores_several_datasets_overall_and_each(trained_bundle, second_dataset, tmp_path):
    bundle, first = trained_bundle["bundle"], trained_bundle["data"]
    alone = [evaluate_bundle(bundle, uri, "test") for uri in (first, second_dataset)]
    both = evaluate_bundle(bundle, [first, second_dataset], "test")
    assert both["n"] == alone[0]["n"] + alone[1]["n"]
    correct = sum(r["top1"] * r["n"] for r in alone)
    assert both["top1"] == pytest.approx(correct / both["n"])
    assert [d["uri"] for d in both["per_dataset"]] == [first, second_dataset]
    for row, report in zip(both["per_dataset"], alone, strict=True):
        assert row["n"] == report["n"] and row["fingerprint"] == report["data_fingerprint"]
        for key in ("top1", "top2", "macro_f1", "ece"):
            assert row[key] == pytest.approx(report[key]), key
    assert both["data_fingerprint"] == joined_fingerprint([r["data_fingerprint"] for r in alone])

    # The CLI's --data, repeated: overall, then one line per dataset.
    result = runner.invoke(app, ["evaluate", "--model", bundle, "--data", first, "--data", second_dataset])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"n={both['n']}  top1={both['top1']:.4f}") and "(calibrated, T=" in lines[0]
    at = lines.index("per dataset:")
    assert [ln.split()[0] for ln in lines[at + 1:at + 3]] == [first, second_dataset]
    assert f"n={alone[1]['n']}  top1={alone[1]['top1']:.4f}" in lines[at + 2]
    # One --data: the report as before (one dataset in per_dataset, no per-dataset lines).
    result = runner.invoke(app, ["evaluate", "--model", bundle, "--data", first, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["top1"] == pytest.approx(alone[0]["top1"]) and len(report["per_dataset"]) == 1


def test_the_cli_passes_each_data_option_on(monkeypatch, tmp_path):
    """train, tune and retrain take --data repeatedly (one given: the plain string, as before)."""
    import fpc_ray.train.driver as driver
    import fpc_ray.train.retrain as retrain
    import fpc_ray.tune.search as search

    seen = []

    def refuse(_cfg_or_spec, data, *args, **kwargs):
        seen.append(data)
        raise UserError("stop here")

    monkeypatch.setattr(driver, "run_training", refuse)
    monkeypatch.setattr(search, "run_search", refuse)
    monkeypatch.setattr(retrain, "retrain", refuse)
    out = str(tmp_path / "out")
    for command, extra in (("train", ["--output", out]), ("tune", ["--output", out]),
                           ("retrain", ["--pointer", out + "/p.json", "--candidates", out])):
        for data in (["a"], ["a", "s3://b/c"]):
            args = [command, *(x for uri in data for x in ("--data", uri)), *extra]
            result = runner.invoke(app, args)
            assert result.exit_code == 2 and result.output == "error: stop here\n", result.output
    assert seen == ["a", ["a", "s3://b/c"]] * 3
    result = runner.invoke(app, ["train", "--output", out])
    assert result.exit_code == 2 and "--data" in result.output
