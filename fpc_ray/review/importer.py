"""``fpc-ray review import``: reviewers' answers for a batch -> a FETAL_PLANES_DB-layout dataset.

Every answer is checked before anything is written: it names a frame of the batch, a known
plane (or ``Unsure``), a brain sub-plane consistent with it, and one frame gets one answer (the
same answer twice, as when a task was imported into Label Studio twice, counts once; two
different answers are an error). A skipped frame (a cancelled annotation, none at all, an empty
CSV cell) and an ``Unsure`` one are left out and counted.

The dataset: ``Images/review_<frame_id>.png`` and ``FETAL_PLANES_DB_data.csv`` as
:mod:`fpc_ray.data.fetal_planes` writes it. ``Patient_num`` is the study: a stable number derived
from the study UID (or the source prefix of a non-DICOM object), the same in every batch, and
``Train `` is 0 for ``--test-fraction`` of the studies (drawn with ``--seed``), 1 for the rest.
``agreement.json`` says how often the model's label was the reviewers'.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fpc_ray.config import StorageConfig
from fpc_ray.data.fetal_planes import BRAIN_PLANES, CLASS_NAMES, CSV_NAME, IMAGE_EXT, IMAGES_DIR, Record, write_csv
from fpc_ray.errors import UserError
from fpc_ray.review.export import MANIFEST
from fpc_ray.review.labelstudio import UNSURE, Answer, parse_export, parse_filled_csv
from fpc_ray.storage import Location, guard, resolve

AGREEMENT = "agreement.json"
NOT_A_BRAIN = "Not A Brain"
BRAIN = "Fetal brain"
OPERATOR = MACHINE = "Other"  # not known for archive frames: the dataset's catch-all value


@dataclass
class Batch:
    uri: str
    location: Location
    frames: dict[str, dict]  # frame_id -> its manifest row


def read_batch(uri: str, storage: StorageConfig | None = None) -> Batch:
    loc = resolve(uri, storage)
    manifest = loc.join(MANIFEST)
    if not manifest.exists():
        raise UserError(f"{loc.uri}: not a review batch (no {MANIFEST}); give the --output of `fpc-ray review export`")
    table = guard(manifest.uri, lambda: pq.read_table(manifest.path, filesystem=manifest.fs))
    return Batch(loc.uri, loc, {r["frame_id"]: r for r in table.to_pylist()})


def read_answers(uri: str, storage: StorageConfig | None = None) -> list[Answer]:
    """The answers in a Label Studio JSON export or a filled ``tasks.csv`` (by the name's suffix,
    else by whether the text starts like JSON)."""
    loc = resolve(uri, storage)
    name = loc.uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        text = loc.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text (expected Label Studio's JSON export or the filled CSV)") from None
    is_json = name.lower().endswith(".json") or (not name.lower().endswith(".csv") and text.lstrip()[:1] in "[{")
    return parse_export(text, name) if is_json else parse_filled_csv(text, name)


def _check(answer: Answer, batch: Batch) -> None:
    if answer.frame_id not in batch.frames:
        raise UserError(f"{answer.where}: frame not in batch {batch.uri}")
    plane, brain = answer.plane, answer.brain_plane
    if plane is not None and plane != UNSURE and plane not in CLASS_NAMES:
        raise UserError(f"{answer.where}: unknown class {plane!r} (expected one of {', '.join(CLASS_NAMES)} "
                        f"or {UNSURE})")
    if brain is not None and brain not in BRAIN_PLANES:
        raise UserError(f"{answer.where}: unknown brain plane {brain!r} (expected one of {', '.join(BRAIN_PLANES)})")
    if brain is not None and plane in CLASS_NAMES and (plane == BRAIN) == (brain == NOT_A_BRAIN):
        raise UserError(f"{answer.where}: brain plane {brain!r} contradicts the plane {plane!r}")


def validate(answers: list[Answer], batch: Batch) -> tuple[dict[str, Answer], Counter]:
    """The labelled frames (frame id -> answer) and counts of ``reviewed``, ``unsure`` and
    ``skipped`` frames of the batch (a batch frame without any entry is skipped).

    Raises:
        UserError: naming the first bad entry.
    """
    given: dict[str, Answer] = {}
    for answer in answers:
        _check(answer, batch)
        if answer.plane is None:
            continue
        earlier = given.setdefault(answer.frame_id, answer)
        if (earlier.plane, earlier.brain_plane) != (answer.plane, answer.brain_plane):
            raise UserError(f"{answer.where}: conflicting answers for one frame: {answer.plane!r} here, "
                            f"{earlier.plane!r} at {earlier.where.split(' (frame')[0]}")
    labelled = {fid: a for fid, a in given.items() if a.plane != UNSURE}
    counts = Counter(reviewed=len(labelled), unsure=len(given) - len(labelled),
                     skipped=len(batch.frames) - len(given))
    return labelled, counts


def patient_num(study: str) -> int:
    """A study's ``Patient_num``: derived from its key alone, so the same in every batch."""
    return int(hashlib.sha256(study.encode()).hexdigest()[:8], 16)


def pick_test_studies(studies: set[str], test_fraction: float, seed: int) -> set[str]:
    """The studies in the test split: ``test_fraction`` of them (rounded), drawn with ``seed``, at least one
    on each side when the fraction is strictly between 0 and 1 and there are two studies."""
    order = sorted(studies)
    random.Random(seed).shuffle(order)
    n_test = math.floor(test_fraction * len(order) + 0.5)  # the nearest count, halves up
    if 0 < test_fraction < 1 and len(order) >= 2:
        n_test = min(max(n_test, 1), len(order) - 1)
    return set(order[:n_test])


def agreement(batch: Batch, labelled: dict[str, Answer], counts: Counter) -> dict:
    """How often the model's label was the reviewers', overall and per reviewed class."""
    right, seen = Counter(), Counter()
    for fid, answer in labelled.items():
        seen[answer.plane] += 1
        right[answer.plane] += batch.frames[fid]["label"] == answer.plane
    n = sum(seen.values())
    return {"batch": batch.uri, "reviewed": counts["reviewed"], "unsure": counts["unsure"],
            "skipped": counts["skipped"], "model_right": sum(right.values()),
            "agreement": round(sum(right.values()) / n, 4) if n else None,
            "per_class": {c: {"reviewed": seen[c], "model_right": right[c],
                              "agreement": round(right[c] / seen[c], 4)} for c in CLASS_NAMES if seen[c]},
            "model_versions": sorted({batch.frames[f]["model_version"] for f in labelled})}


def _records(batch: Batch, labelled: dict[str, Answer], test_fraction: float, seed: int) -> list[Record]:
    test = pick_test_studies({batch.frames[f]["study"] for f in labelled}, test_fraction, seed)
    records = []
    for fid in sorted(labelled, key=lambda f: (batch.frames[f]["study"], f)):
        answer, study = labelled[fid], batch.frames[fid]["study"]
        brain = answer.brain_plane or ("Other" if answer.plane == BRAIN else NOT_A_BRAIN)
        records.append(Record(f"review_{fid}", patient_num(study), answer.plane, brain, OPERATOR, MACHINE,
                              study not in test))
    return records


def _refuse_non_empty(out: Location) -> None:
    entries = guard(out.uri, lambda: out.fs.get_file_info(pafs.FileSelector(out.path, allow_not_found=True)))
    if entries or out.info().type == pafs.FileType.File:
        raise UserError(f"{out.uri}: exists and is not empty; give a new --output for the dataset")


def import_answers(annotations: str, batch_uri: str, output: str, test_fraction: float = 0.2, seed: int = 0,
                   storage: StorageConfig | None = None, echo: Callable[[str], None] = print) -> dict:
    """Validate the answers in ``annotations`` against the batch, then write the dataset at ``output``.

    Returns:
        The agreement summary, as written to ``agreement.json``.

    Raises:
        UserError: a bad entry (named), an output that is not empty, or no labelled frame; nothing
            is written then.
    """
    batch = read_batch(batch_uri, storage)
    out = resolve(output, storage)
    _refuse_non_empty(out)
    labelled, counts = validate(read_answers(annotations, storage), batch)
    if not labelled:
        raise UserError(f"{annotations}: no frame of the batch has a class ({counts['unsure']} unsure, "
                        f"{counts['skipped']} skipped); nothing to write")
    records = _records(batch, labelled, test_fraction, seed)
    for record in records:
        fid = record.image_name.removeprefix("review_")
        image = batch.location.join("images", f"{fid}.png").read_bytes()
        out.join(IMAGES_DIR, record.image_name + IMAGE_EXT).write_bytes(image)
    out.join(CSV_NAME).write_text(write_csv(records))
    summary = agreement(batch, labelled, counts)
    summary["test_studies"] = len({r.patient for r in records if not r.official_train})
    summary["train_studies"] = len({r.patient for r in records if r.official_train})
    out.join(AGREEMENT).write_text(json.dumps(summary, indent=2))
    return summary
