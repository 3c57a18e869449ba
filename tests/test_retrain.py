"""The retraining loop promotes a better candidate, refuses a worse one, and records both."""

from __future__ import annotations

import json

import pytest

from fpc_ray.bundle import read_card, read_pointer, write_pointer
from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.errors import UserError
from fpc_ray.train.retrain import retrain


def _cfg(**sets):
    base = {"data.image_size": 64, "train.num_workers": 0, "train.batch_size": 16, "train.frozen_epochs": 0}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_retrain_promotes_better_and_refuses_worse(tmp_path):
    data = tmp_path / "data"
    synthesize(str(data), per_class=24, seed=21, width=128, height=96)
    pointer, candidates = str(tmp_path / "models" / "production.json"), str(tmp_path / "models" / "candidates")

    # No production yet: a barely trained first model is promoted (the bootstrap).
    first = retrain(_cfg(**{"train.epochs": 1, "train.lr": 1e-6}), str(data), pointer, candidates, echo=lambda s: None)
    assert first.promoted and first.production_top1 is None
    assert read_pointer(pointer)["bundle"] == first.candidate_uri

    # A real fine-tune from it is better on the same test set: promoted, pointer moves.
    better = retrain(_cfg(**{"train.epochs": 3}), str(data), pointer, candidates, echo=lambda s: None)
    assert better.production_top1 == pytest.approx(first.candidate_top1)
    assert better.candidate_top1 > better.production_top1
    assert better.promoted, better.line
    record = read_pointer(pointer)
    assert record["bundle"] == better.candidate_uri and record["previous"]["bundle"] == first.candidate_uri
    card = read_card(better.candidate_uri)
    assert card["lineage"]["parent_uri"] == first.candidate_uri
    assert card["promotion"]["decision"] == "promoted"
    assert card["promotion"]["production"]["top1"] == pytest.approx(first.candidate_top1)

    # A wrecked fine-tune (learning rate 1.0) is worse by more than the margin: refused, pointer kept.
    worse = retrain(_cfg(**{"train.epochs": 1, "train.lr": 1.0, "train.grad_clip": 0}), str(data), pointer,
                    candidates, margin=0.01, echo=lambda s: None)
    assert worse.candidate_top1 < better.candidate_top1 - 0.01
    assert not worse.promoted and "refused" in worse.line
    assert read_pointer(pointer)["bundle"] == better.candidate_uri
    assert read_card(worse.candidate_uri)["promotion"]["decision"] == "refused"

    # Everything that takes a model takes the pointer.
    assert read_card(pointer)["version"] == read_card(better.candidate_uri)["version"]


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
    from fpc_ray.errors import ConcurrentChange

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
