"""The review loop end to end on phantoms and SeaweedFS: label -> export (Label Studio JSON + CSV)
-> simulated review -> import -> retrain from production on base + reviewed data -> promotion
decided, the reviewed class's scores in the card and the bundle report; and its job's refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fpc_ray.bundle import read_card, read_pointer
from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.report import build_report
from fpc_ray.review.demo import CONFUSED, LoopDemoSizes, run_loop_demo
from fpc_ray.review.loop import imported_datasets, ingest_answers
from fpc_ray.storage import resolve

TINY = LoopDemoSizes(base_per_class=8, archive_per_class=6, holdout_per_class=3, review_n=18, image_size=64,
                     epochs=2, width=128, height=96)
ROOT = "s3://review-loop/night"


@pytest.fixture(scope="module")
def loop(s3_server, ray_local):
    s3_server.create_bucket("review-loop")
    lines: list[str] = []
    result = run_loop_demo(ROOT, TINY, overrides=["train.batch_size=8", "train.frozen_epochs=0"],
                           echo=lines.append)
    return result, lines


def test_the_loop_runs_end_to_end_and_records_the_reviewed_class(loop):
    result, lines = loop
    assert result["first"].promoted  # no production yet: the first model becomes production
    assert result["run"]["labelled"] == 6 * TINY.archive_per_class
    batch = resolve(result["batch"]["batch"])
    assert result["batch"]["frames"] == TINY.review_n
    assert len(json.loads(batch.join("tasks.json").read_bytes())) == TINY.review_n
    assert batch.join("tasks.csv").read_text().count("\n") == TINY.review_n + 1  # header + one line a frame
    reviewed = imported_datasets(f"{ROOT}/datasets")
    assert len(reviewed) == 1 and reviewed[0].startswith(batch.uri.rsplit("/batches/", 1)[0])
    agreement = json.loads(resolve(reviewed[0]).join("agreement.json").read_bytes())
    assert agreement["reviewed"] == TINY.review_n and agreement["skipped"] == 0

    decision = result["decision"]
    card = read_card(decision.candidate_uri)
    assert card["promotion"]["decision"] == ("promoted" if decision.promoted else "refused")
    assert [d["uri"] for d in card["datasets"]] == [f"{ROOT}/base", reviewed[0]]
    per_dataset = card["promotion"]["candidate"]["per_dataset"]
    assert [d["uri"] for d in per_dataset] == [f"{ROOT}/base", reviewed[0]]
    production = card["promotion"]["production"]
    assert production["uri"] == result["first"].candidate_uri
    pointer = read_pointer(f"{ROOT}/models/production.json")
    assert pointer["bundle"] == (decision.candidate_uri if decision.promoted else result["first"].candidate_uri)
    # The recall of each class present in the reviewed test split, both models', in card and report.
    recalled = [d for d in per_dataset if d["recall"]]
    assert recalled and all(set(d["recall"]) <= set(card["class_names"]) for d in recalled)
    html = build_report(decision.candidate_uri, StorageConfig())[1]
    assert "test recall per class on" in html and "(production " in html
    assert set(result["recall_before"]) == set(result["recall_after"]) == set(card["class_names"])
    assert any(line.startswith("recall on held-out archive-like phantoms") for line in lines)
    assert sum(CONFUSED in line and " -> " in line for line in lines) == 1


def test_a_malformed_export_is_refused_with_one_line_and_nothing_changes(loop):
    from fpc_ray.config import load_config

    result, _ = loop
    answers = resolve(f"{ROOT}/bad-answers.json")
    tasks = json.loads(resolve(result["batch"]["batch"]).join("tasks.json").read_bytes())
    bad = [{"data": tasks[0]["data"], "annotations": [{"result": [
        {"from_name": "plane", "to_name": "image", "type": "choices", "value": {"choices": ["Fetal liver"]}}]}]}]
    answers.write_text(json.dumps(bad))
    pointer_before = read_pointer(f"{ROOT}/models/production.json")
    with pytest.raises(UserError, match="unknown class 'Fetal liver'") as e:
        ingest_answers(answers.uri, result["batch"]["batch"], f"{ROOT}/datasets-2", [f"{ROOT}/base"],
                       f"{ROOT}/models/production.json", f"{ROOT}/models/candidates", load_config(None, None),
                       echo=lambda _: None)
    assert "\n" not in str(e.value)
    assert imported_datasets(f"{ROOT}/datasets-2") == []
    assert read_pointer(f"{ROOT}/models/production.json") == pointer_before
    # The same batch again: already imported, refused before anything is trained.
    with pytest.raises(UserError, match="already imported"):
        ingest_answers(answers.uri, result["batch"]["batch"], f"{ROOT}/datasets", [f"{ROOT}/base"],
                       f"{ROOT}/models/production.json", f"{ROOT}/models/candidates", load_config(None, None),
                       echo=lambda _: None)


def test_review_loop_job_exports_the_next_batch_and_refuses_bad_arguments(loop, capsys):
    path = Path(__file__).resolve().parent.parent / "jobs" / "review_loop.py"  # a script, not a package
    spec = importlib.util.spec_from_file_location("review_loop", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    main = job.main
    assert main(["export", "--labels", f"{ROOT}/labels", "--batches", f"{ROOT}/batches", "--n", "6",
                 "--strategy", "random"]) == 0
    out = capsys.readouterr().out
    assert "review batch s3://review-loop/night/batches/" in out and f"({TINY.review_n} exported before)" in out
    assert main(["export", "--labels", f"{ROOT}/labels", "--batches", f"{ROOT}/batches", "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --n 0: must be 1 or more"
