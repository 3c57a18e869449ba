"""The retraining loop: the promotion rule, one real retrain from a production pointer, and the
pointer's compare-and-swap."""

from __future__ import annotations

import json

import pytest

from fpc_ray.bundle import read_card, read_pointer, write_pointer
from fpc_ray.config import load_config
from fpc_ray.errors import ConcurrentChange, UserError
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.train.retrain import promotes, retrain


def _cfg(**sets):
    base = {"data.image_size": 64, "train.num_workers": 0, "train.batch_size": 16, "train.frozen_epochs": 0,
            "train.epochs": 1, "train.lr": 1e-4}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize(("candidate", "production", "margin", "promoted"), [
    (0.10, None, 0.01, True),    # no production model yet: the first candidate is promoted
    (0.80, 0.80, 0.0, True),     # equal
    (0.90, 0.80, 0.0, True),     # better
    (0.80, 0.81, 0.01, True),    # worse by exactly the margin (0.81 - 0.80 > 0.01 in binary floats)
    (0.795, 0.80, 0.01, True),   # worse, within the margin
    (0.79, 0.81, 0.01, False),   # worse by more than the margin
    (0.7999, 0.80, 0.0, False),  # no margin: any drop refuses
])
def test_promotion_rule(candidate, production, margin, promoted):
    assert promotes(candidate, production, margin) is promoted


def _production(trained_bundle, tmp_path) -> tuple[str, str, str]:
    """A pointer at the session's trained bundle, the candidates' prefix and the data."""
    pointer, candidates = str(tmp_path / "models" / "production.json"), str(tmp_path / "models" / "candidates")
    (tmp_path / "models").mkdir()
    version = read_card(trained_bundle["bundle"])["version"]
    write_pointer(pointer, {"bundle": trained_bundle["bundle"], "version": version})
    return pointer, candidates, trained_bundle["data"]


def test_retrain_fine_tunes_production_scores_both_and_records_the_decision(trained_bundle, tmp_path):
    """On two datasets (the base data and a second, as a batch of reviewed frames would be): the
    candidate trains on both, both models are scored on the union of the test splits and on each,
    and the decision is the promotion rule's on those scores, recorded consistently in the line,
    the card and the pointer. Which way it goes depends on the CPU's floating-point path (a
    one-epoch fine-tune of phantoms), so both ways are checked, not one of them asserted."""
    from fpc_ray.data.fetal_planes import read_fetal_planes
    from fpc_ray.data.synth import synthesize

    pointer, candidates, data = _production(trained_bundle, tmp_path)
    before = read_pointer(pointer)
    second = str(tmp_path / "second")
    synthesize(second, per_class=6, seed=21, width=128, height=96)
    datasets = [data, second]
    production = evaluate_bundle(trained_bundle["bundle"], datasets, "test")
    decision = retrain(_cfg(), datasets, pointer, candidates, margin=0.05, echo=lambda s: None)
    candidate = evaluate_bundle(decision.candidate_uri, datasets, "test")
    assert decision.production_top1 == pytest.approx(production["top1"])
    assert decision.candidate_top1 == pytest.approx(candidate["top1"])
    assert decision.promoted is promotes(decision.candidate_top1, decision.production_top1, 0.05)
    per_dataset = [f"{c['uri']} {c['top1']:.4f} vs {p['top1']:.4f}"
                   for c, p in zip(candidate["per_dataset"], production["per_dataset"], strict=True)]
    assert decision.line.endswith("; test top-1 per dataset (candidate vs production): " + ", ".join(per_dataset))
    record = read_pointer(pointer)
    if decision.promoted:
        assert decision.line.startswith(f"promoted {decision.candidate_uri}")
        assert record["bundle"] == decision.candidate_uri and record["previous"]["bundle"] == trained_bundle["bundle"]
        assert record["test_top1"] == pytest.approx(candidate["top1"])
    else:
        assert decision.line.startswith(f"refused {decision.candidate_uri}") and f"{pointer} unchanged" in decision.line
        assert record == before
    card = read_card(decision.candidate_uri)
    assert card["lineage"]["parent_uri"] == trained_bundle["bundle"]
    dbs = [read_fetal_planes(uri) for uri in datasets]
    assert card["datasets"] == [{"uri": uri, "fingerprint": db.fingerprint,
                                 "splits": {n: len(db.split(n, 0.15, 0)) for n in ("train", "val", "test")}}
                                for uri, db in zip(datasets, dbs, strict=True)]
    assert card["data"]["uri"] == f"{data} + {second}"
    promotion = card["promotion"]
    assert promotion["decision"] == ("promoted" if decision.promoted else "refused") and promotion["margin"] == 0.05
    assert promotion["production"]["top1"] == pytest.approx(production["top1"])

    def scores(report: dict) -> list[dict]:
        return [{k: d[k] for k in ("uri", "n", "top1", "top2", "recall")} for d in report["per_dataset"]]

    assert promotion["candidate"] == {"version": card["version"], "top1": candidate["top1"], "top2": candidate["top2"],
                                      "per_dataset": scores(candidate)}
    recorded = promotion["production"]["per_dataset"]
    assert [(d["uri"], d["n"]) for d in recorded] == [(d["uri"], d["n"]) for d in scores(production)]
    assert [d["top1"] for d in recorded] == pytest.approx([d["top1"] for d in scores(production)])
    assert promotion["test_data"]["n"] == candidate["n"] == sum(len(db.split("test", 0.15, 0)) for db in dbs) > 0
    assert [d["n"] for d in promotion["test_data"]["datasets"]] == [d["n"] for d in candidate["per_dataset"]]
    # Everything that takes a model takes the pointer.
    assert read_card(pointer)["version"] == (card["version"] if decision.promoted else before["version"])


def _scored(top1: float, uri: str = "d") -> dict:
    """An evaluation report as evaluate_bundle returns it, with a chosen top-1."""
    return {"top1": top1, "top2": 1.0, "n": 10, "data_fingerprint": "f", "model_version": "v",
            "per_dataset": [{"uri": uri, "n": 10, "fingerprint": "f", "top1": top1, "top2": 1.0, "recall": {}}]}


@pytest.mark.parametrize(("candidate", "production", "promoted"), [
    (0.90, 0.80, True),   # better
    (0.78, 0.80, True),   # worse, within the margin (0.05)
    (0.70, 0.80, False),  # worse by more than the margin
])
def test_retrain_gate_follows_the_scores_it_is_given(candidate, production, promoted, tmp_path, monkeypatch):
    """The gate inside retrain, with controlled scores in place of training and evaluation: the
    pointer moves exactly when the rule promotes, and the card records the decision either way."""
    import fpc_ray.train.driver as driver
    import fpc_ray.train.retrain as retrain_module
    from fpc_ray.storage import resolve

    pointer = str(tmp_path / "production.json")
    write_pointer(pointer, {"bundle": "prod-bundle", "version": "p1"})

    class Trained:
        card = {"version": "c1", "class_names": ["a"]}

    def fake_training(cfg, data, uri):
        assert cfg.train.init_from == "prod-bundle"  # fine-tunes production
        resolve(uri).makedirs()
        return Trained()

    monkeypatch.setattr(driver, "run_training", fake_training)
    monkeypatch.setattr(retrain_module, "evaluate_bundle",
                        lambda uri, *a, **k: _scored(production if uri == "prod-bundle" else candidate))
    decision = retrain(_cfg(), "d", pointer, str(tmp_path / "candidates"), margin=0.05, echo=lambda s: None)
    assert decision.promoted is promoted
    assert read_pointer(pointer)["bundle"] == (decision.candidate_uri if promoted else "prod-bundle")
    recorded = json.loads((tmp_path / "candidates" / decision.candidate_uri.rsplit("/", 1)[1] / "model.json")
                          .read_text())["promotion"]
    assert recorded["decision"] == ("promoted" if promoted else "refused")
    assert (recorded["candidate"]["top1"], recorded["production"]["top1"]) == (candidate, production)


def test_retrain_whose_pointer_moves_meanwhile_is_void(trained_bundle, tmp_path):
    pointer, candidates, data = _production(trained_bundle, tmp_path)

    def rollback_meanwhile(line: str) -> None:  # called once the retrain has read the pointer
        write_pointer(pointer, {"bundle": trained_bundle["bundle"], "version": "rolled-back"})

    with pytest.raises(ConcurrentChange, match="moved while this retrain ran"):
        retrain(_cfg(), data, pointer, candidates, margin=1.0, echo=rollback_meanwhile)
    assert read_pointer(pointer)["version"] == "rolled-back"  # the rollback stands
    (candidate,) = (tmp_path / "models" / "candidates").iterdir()
    assert read_card(str(candidate))["promotion"]["decision"].startswith("void")


def test_unwritable_pointer_fails_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match="a-file"):
        retrain(_cfg(), str(tmp_path / "data"), str(tmp_path / "a-file" / "production.json"),
                str(tmp_path / "candidates"), echo=lambda s: None)
    assert not (tmp_path / "candidates").exists()  # nothing trained, nothing written


def test_pointer_errors_are_user_errors(tmp_path):
    bad = tmp_path / "p.json"
    with pytest.raises(UserError, match="no such model pointer"):
        read_card(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_card(str(bad))
    bad.write_text(json.dumps({"bundle": "x"}))
    with pytest.raises(UserError, match="not an fpc-ray model pointer"):
        read_card(str(bad))
    write_pointer(str(bad), {"bundle": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="not a model bundle"):
        read_card(str(bad))
    assert not list(tmp_path.glob("p.json.tmp-*"))  # the atomic write leaves no temporary behind


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pointer_rewrite_is_a_compare_and_swap(where, tmp_path, request):
    """A promotion rewrites the pointer only if it is still what the retrain read at its start."""
    from fpc_ray.bundle import read_pointer_state

    if where == "s3":
        import uuid

        request.getfixturevalue("s3_server")
        uri = f"s3://test/models-{uuid.uuid4().hex[:8]}/production.json"
    else:
        uri = str(tmp_path / "models" / "production.json")
        (tmp_path / "models").mkdir()

    empty = read_pointer_state(uri)
    assert empty.record is None and empty.token is None
    write_pointer(uri, {"bundle": "b1"}, expected=empty)  # the bootstrap: only if still absent
    with pytest.raises(ConcurrentChange, match="moved since it was read"):
        write_pointer(uri, {"bundle": "racer"}, expected=empty)  # a second bootstrap loses

    start = read_pointer_state(uri)  # a retrain starts...
    write_pointer(uri, {"bundle": "rolled-back"})  # ...and a manual rollback moves the pointer
    with pytest.raises(ConcurrentChange, match="concurrent retrain or a manual rollback"):
        write_pointer(uri, {"bundle": "b2"}, expected=start)
    assert read_pointer(uri)["bundle"] == "rolled-back"

    now = read_pointer_state(uri)
    write_pointer(uri, {"bundle": "b3"}, expected=now)  # unchanged since read: rewritten
    assert read_pointer(uri)["bundle"] == "b3" and read_pointer_state(uri).token != now.token
    if where == "local":
        assert not list((tmp_path / "models").glob("production.json.tmp-*"))
