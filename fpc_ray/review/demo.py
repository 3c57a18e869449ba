"""``fpc-ray review demo``: the whole review loop on phantoms, with a script as the reviewer.

A first model trained on clean phantoms meets an archive where a share of one plane's images
look like another plane (``synth --confuse``): it gets them wrong. The loop runs as it would each
night: label the archive, export a review batch, let the "reviewer" answer with the phantoms'
ground truth (a Label Studio JSON export, written as Label Studio would), import the answers,
retrain from production on the base data plus the reviewed frames, promote or not. The model
before and after is then scored on held-out phantoms drawn like the archive: the recall of the
classes the first model confuses is what the loop is for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from fpc_ray.config import Config, load_config
from fpc_ray.data.fetal_planes import IMAGE_EXT, read_fetal_planes
from fpc_ray.data.synth import synthesize
from fpc_ray.label.pipeline import LabelOptions, run_labelling
from fpc_ray.review import Strategy
from fpc_ray.review.export import ExportOptions
from fpc_ray.review.loop import export_night, ingest_answers
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.storage import resolve
from fpc_ray.train.retrain import retrain

CONFUSED, LOOKALIKE = "Fetal thorax", "Fetal abdomen"


@dataclass(frozen=True)
class LoopDemoSizes:
    base_per_class: int = 40
    archive_per_class: int = 40
    holdout_per_class: int = 20
    review_n: int = 90
    image_size: int = 96
    epochs: int = 5
    width: int = 256
    height: int = 192


def _config(sizes: LoopDemoSizes, overrides: list[str] | None) -> Config:
    return load_config(None, [f"data.image_size={sizes.image_size}", f"train.epochs={sizes.epochs}",
                              "train.num_workers=0", *(overrides or [])])


def phantom_archive(root: str, sizes: LoopDemoSizes) -> dict[str, str]:
    """Look-alike phantoms under ``ROOT/archive/study-<patient>/`` (one folder per study, as
    scanners export them); returns each object's URI -> its true plane."""
    src = resolve(root).join("archive-src").uri
    records = synthesize(src, per_class=sizes.archive_per_class, seed=11, width=sizes.width, height=sizes.height,
                         confuse=(CONFUSED, LOOKALIKE), confuse_share=0.6)
    db, archive, truth = read_fetal_planes(src), resolve(root).join("archive"), {}
    for r in records:
        obj = archive.join(f"study-{r.patient:05d}", r.image_name + IMAGE_EXT)
        obj.write_bytes(db.image_location(r).read_bytes())
        truth[obj.uri] = r.plane
    return truth


def simulated_review(batch: str, truth: dict[str, str], answers: str) -> int:
    """Answer every task of ``batch`` with its ground truth, as Label Studio's JSON export; the
    number of answers."""
    tasks = json.loads(resolve(batch).join("tasks.json").read_bytes())
    exported = [{"id": i, "data": t["data"], "annotations": [{
        "id": i, "was_cancelled": False, "created_at": "2026-11-26T09:00:00Z",
        "result": [{"from_name": "plane", "to_name": "image", "type": "choices",
                    "value": {"choices": [truth[t["data"]["source_uri"]]]}}]}]}
        for i, t in enumerate(tasks, start=1)]
    resolve(answers).write_text(json.dumps(exported, indent=1))
    return len(exported)


def held_out_recall(model_uri: str, holdout: str) -> dict[str, float]:
    """Each class's recall on the held-out archive-like phantoms (their test split)."""
    return {name: c["recall"] for name, c in evaluate_bundle(model_uri, holdout, "test")["per_class"].items()}


def recall_lines(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """The held-out recall per class, before and after the loop, the most confused class first."""
    order = sorted(before, key=lambda name: before[name])
    return [f"      {name:<16} {before[name]:.2f} -> {after[name]:.2f}" for name in order]


def run_loop_demo(root: str, sizes: LoopDemoSizes = LoopDemoSizes(), overrides: list[str] | None = None,
                  echo: Callable[[str], None] = print) -> dict:
    """Run the loop under ``root`` (a folder or ``s3://`` prefix); what happened, as a dict."""
    cfg, at = _config(sizes, overrides), resolve(root)
    base, holdout, pointer = at.join("base").uri, at.join("holdout").uri, at.join("models", "production.json").uri
    candidates = at.join("models", "candidates").uri
    echo(f"[1/6] phantoms: clean base data, an archive where {CONFUSED} often looks like {LOOKALIKE}")
    synthesize(base, per_class=sizes.base_per_class, seed=10, width=sizes.width, height=sizes.height)
    synthesize(holdout, per_class=sizes.holdout_per_class, seed=12, width=sizes.width, height=sizes.height,
               train_fraction=0.0, confuse=(CONFUSED, LOOKALIKE), confuse_share=0.6)
    truth = phantom_archive(root, sizes)
    echo("[2/6] the first production model, trained on the base data")
    first = retrain(cfg, [base], pointer, candidates, echo=echo)
    echo(f"      {first.line}")
    echo("[3/6] labelling the archive with production")
    run = run_labelling(pointer, at.join("archive").uri, at.join("labels").uri, LabelOptions(), cfg.storage, echo)
    echo(f"[4/6] review batch of the {sizes.review_n} least certain frames")
    batch = export_night(at.join("labels").uri, at.join("batches").uri,
                         ExportOptions(n=sizes.review_n, strategy=Strategy.least_confident), cfg.storage, echo)
    answers = at.join("answers.json").uri
    answered = simulated_review(batch["batch"], truth, answers)
    echo(f"[5/6] the reviewer (a script with the ground truth) answers {answered} tasks")
    echo("[6/6] import the answers, retrain from production on base + reviewed, promote or not")
    decision = ingest_answers(answers, batch["batch"], at.join("datasets").uri, [base], pointer, candidates, cfg,
                              echo=echo)
    before, after = held_out_recall(first.candidate_uri, holdout), held_out_recall(decision.candidate_uri, holdout)
    echo(f"recall on held-out archive-like phantoms, before -> after the loop "
         f"({'promoted' if decision.promoted else 'refused'}: {decision.candidate_uri}):")
    for line in recall_lines(before, after):
        echo(line)
    return {"first": first, "run": run, "batch": batch, "decision": decision, "recall_before": before,
            "recall_after": after}


def run_demo_with_embedded_s3(workdir: str, sizes: LoopDemoSizes = LoopDemoSizes(),
                              echo: Callable[[str], None] = print) -> dict:
    """The CLI's demo: the loop on an embedded S3 server under ``workdir``, a local Ray cluster."""
    from fpc_ray.devtools.s3server import EmbeddedS3

    with EmbeddedS3(os.path.join(workdir, "s3")) as server:
        os.environ.update(server.env())  # before Ray starts: its workers inherit the endpoint
        server.create_bucket("review-demo")
        return run_loop_demo("s3://review-demo/loop", sizes, echo=echo)
