"""``fpc-ray review import``: reviewers' answers for a batch -> a FETAL_PLANES_DB-layout dataset.

Every answer is checked before anything is written: it names a frame of the batch, a known
plane (or ``Unsure``), a brain sub-plane consistent with it, and one frame gets one answer (the
same answer twice, as when a task was imported into Label Studio twice or two reviewers agree,
counts once; two different answers, two reviewers who disagree included, are an error). A
skipped frame (a cancelled annotation, none at all, an empty CSV cell) and an ``Unsure`` one are
left out and counted.

The dataset: ``Images/review_<frame_id>.png`` and ``FETAL_PLANES_DB_data.csv`` as
:mod:`fpc_ray.data.fetal_planes` writes it. ``Patient_num`` is the study: a stable number derived
from the study UID (or the source prefix of a non-DICOM object), the same in every batch, and
``Train `` is 0 for a study whose hash with ``--seed`` falls below ``--test-fraction`` (about that share
of the studies; the same study on the same side in every batch), 1 for the rest.
``agreement.json`` says how often the model's label was the reviewers'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from fpc_ray.config import StorageConfig
from fpc_ray.data.fetal_planes import BRAIN_PLANES, CLASS_NAMES, CSV_NAME, IMAGE_EXT, IMAGES_DIR, Record, write_csv
from fpc_ray.errors import UserError, printable
from fpc_ray.files import read_bounded
from fpc_ray.review.export import MANIFEST, read_manifest
from fpc_ray.review.labelstudio import UNSURE, Answer, parse_export, parse_filled_csv, shown
from fpc_ray.storage import Location, resolve

AGREEMENT = "agreement.json"
NOT_A_BRAIN = "Not A Brain"
BRAIN = "Fetal brain"
OPERATOR = MACHINE = "Other"  # not known for archive frames: the dataset's catch-all value
MIN_STUDIES = 5  # fewer, and a split by study is mostly chance


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
    table = read_manifest(manifest)
    return Batch(loc.uri, loc, {r["frame_id"]: r for r in table.to_pylist()})


def read_answers(uri: str, storage: StorageConfig | None = None) -> list[Answer]:
    """The answers in a Label Studio JSON export or a filled ``tasks.csv`` (by the name's suffix,
    else by whether the text starts like JSON); UTF-8, else Windows-1252; at most
    :data:`fpc_ray.files.MAX_JSON_BYTES` (thousands of times a batch's answers)."""
    loc = resolve(uri, storage)
    name = printable(loc.uri.rstrip("/").rsplit("/", 1)[-1])  # named in every message about an entry
    data = read_bounded(loc, "annotation export")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:  # Excel on Windows saves CSV in the ANSI code page
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise UserError(f"{name}: neither UTF-8 nor Windows-1252 text (expected Label Studio's JSON export "
                            f"or the filled CSV)") from None
    is_json = name.lower().endswith(".json") or (not name.lower().endswith(".csv") and text.lstrip()[:1] in "[{")
    return parse_export(text, name) if is_json else parse_filled_csv(text, name)


def _frame_of(answer: Answer, batch: Batch) -> Answer:
    """The answer, naming its batch frame by the CSV's (source_uri, frame) when a spreadsheet
    turned that frame's all-digit frame_id into a number (``1.23457E+15``): the pair names
    exactly one frame, and the answer's frame_id is what a spreadsheet shows of that frame's id.
    Any other frame_id not in the batch stays as it is, and is refused: a frame id of another
    batch is not this batch's frame, even where its object and index match one."""
    if answer.frame_id in batch.frames or answer.source_uri is None or answer.frame is None:
        return answer
    same = [fid for fid, m in batch.frames.items()
            if (m["source_uri"], m["frame"]) == (answer.source_uri, int(answer.frame))]
    if len(same) == 1 and _spreadsheet_number_of(answer.frame_id, same[0]):
        return dataclasses.replace(answer, frame_id=same[0])
    return answer


def _spreadsheet_number_of(shown_id: str, frame_id: str) -> bool:
    """Whether ``shown_id`` is how a spreadsheet writes the all-digit ``frame_id`` as a number:
    rounded to the digits it shows (``1.23457E+15``, ``1234567890123460``), leading zeros gone."""
    if not frame_id.isdigit() or len(shown_id) > 32:
        return False
    try:
        number = decimal.Decimal(shown_id).normalize()
        if not number.is_finite() or number.as_tuple().exponent < 0:
            return False
        digits = decimal.Decimal(1).scaleb(number.as_tuple().exponent)
        return decimal.Decimal(frame_id).quantize(digits, rounding=decimal.ROUND_HALF_UP) == number
    except decimal.DecimalException:  # not a number at all
        return False


def _check(answer: Answer, batch: Batch) -> None:
    if answer.frame_id not in batch.frames:
        raise UserError(f"{answer.where}: frame not in batch {printable(batch.uri)}")
    plane, brain = answer.plane, answer.brain_plane
    if plane is not None and plane != UNSURE and plane not in CLASS_NAMES:
        raise UserError(f"{answer.where}: unknown class {shown(plane)} (expected one of {', '.join(CLASS_NAMES)} "
                        f"or {UNSURE})")
    if brain is not None and brain not in BRAIN_PLANES:
        raise UserError(f"{answer.where}: unknown brain plane {shown(brain)} (expected one of "
                        f"{', '.join(BRAIN_PLANES)})")
    if brain is not None and plane in CLASS_NAMES and (plane == BRAIN) == (brain == NOT_A_BRAIN):
        raise UserError(f"{answer.where}: brain plane {brain!r} contradicts the plane {plane!r}")


def validate(answers: list[Answer], batch: Batch) -> tuple[dict[str, Answer], Counter]:
    """The labelled frames (frame id -> answer) and counts of ``reviewed``, ``unsure`` and
    ``skipped`` frames of the batch (a batch frame without any entry is skipped).

    Raises:
        UserError: naming the first bad entry.
    """
    given: dict[str, Answer] = {}
    for answer in map(lambda a: _frame_of(a, batch), answers):
        _check(answer, batch)
        if answer.plane is None:
            continue
        earlier = given.setdefault(answer.frame_id, answer)
        if (earlier.plane, earlier.brain_plane) != (answer.plane, answer.brain_plane):
            there = ("in another annotation of this task" if earlier.where == answer.where
                     else f"at {earlier.where.split(' (frame')[0]}")
            raise UserError(f"{answer.where}: conflicting answers for one frame: {answer.plane!r} here, "
                            f"{earlier.plane!r} {there}")
    labelled = {fid: a for fid, a in given.items() if a.plane != UNSURE}
    counts = Counter(reviewed=len(labelled), unsure=len(given) - len(labelled),
                     skipped=len(batch.frames) - len(given))
    return labelled, counts


def patient_num(study: str) -> int:
    """A study's ``Patient_num``: derived from its key alone, so the same in every batch."""
    return int(hashlib.sha256(study.encode()).hexdigest()[:8], 16)


def is_test_study(study: str, test_fraction: float, seed: int) -> bool:
    """Whether a study is in the test split: a function of the study (and seed) alone, so a study
    answered in several batches is on the same side in each, and a retrain never scores on a
    study it trained on. About ``test_fraction`` of many studies are."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{study}".encode()).digest()[:8], "big") / 2**64
    return draw < test_fraction


def pick_test_studies(studies: set[str], test_fraction: float, seed: int,
                      echo: Callable[[str], None] = print) -> set[str]:
    """The studies in the test split (see :func:`is_test_study`); warns when a side the fraction
    asks for is empty, or when there are too few studies for the fraction to mean much."""
    # Studies whose Patient_num collide (32 bits of a hash) are one patient to the dataset reader,
    # which refuses a patient on both sides: each such group takes its first study's side.
    first_of = {}
    for s in sorted(studies):
        first_of.setdefault(patient_num(s), s)
    test = {s for s in studies if is_test_study(first_of[patient_num(s)], test_fraction, seed)}
    empty = [side for side, n, wanted in (("test", len(test), test_fraction > 0),
                                          ("train", len(studies) - len(test), test_fraction < 1)) if wanted and not n]
    if empty or len(studies) < MIN_STUDIES:
        echo(f"warning: {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} answered, {len(test)} in test"
             f"{' (the ' + ' and '.join(empty) + ' split is empty)' if empty else ''}; a split by study needs "
             f"{MIN_STUDIES} or more (a folder of PNGs without study UIDs is one study)")
    return test


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


def _records(batch: Batch, labelled: dict[str, Answer], test_fraction: float, seed: int,
             echo: Callable[[str], None]) -> list[Record]:
    test = pick_test_studies({batch.frames[f]["study"] for f in labelled}, test_fraction, seed, echo)
    records = []
    for fid in sorted(labelled, key=lambda f: (batch.frames[f]["study"], f)):
        answer, study = labelled[fid], batch.frames[fid]["study"]
        brain = answer.brain_plane or ("Other" if answer.plane == BRAIN else NOT_A_BRAIN)
        records.append(Record(f"review_{fid}", patient_num(study), answer.plane, brain, OPERATOR, MACHINE,
                              study not in test))
    return records


def _refuse_non_empty(out: Location) -> None:
    """Refuse an output holding a file. Empty folders hold nothing to lose: some S3 servers
    (SeaweedFS) keep a folder a failed import emptied, and the import must run again."""
    if any(e.type == pafs.FileType.File for e in out.entries(recursive=True)) or out.info().type == pafs.FileType.File:
        raise UserError(f"{printable(out.uri)}: exists and is not empty; give a new --output for the dataset")


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
        raise UserError(f"{printable(annotations)}: no frame of the batch has a class ({counts['unsure']} unsure, "
                        f"{counts['skipped']} skipped); nothing to write")
    images = {f"review_{fid}": batch.location.join("images", f"{fid}.png") for fid in labelled}
    missing = [loc.uri for loc in images.values() if not loc.exists()]
    if missing:
        raise UserError(f"{printable(batch.uri)}: {len(missing)} answered frame(s) have no image in the batch, "
                        f"e.g. {printable(missing[0])}; nothing written")
    records = _records(batch, labelled, test_fraction, seed, echo)
    summary = agreement(batch, labelled, counts)
    summary["test_studies"] = len({r.patient for r in records if not r.official_train})
    summary["train_studies"] = len({r.patient for r in records if r.official_train})
    _write_dataset(out, records, images, summary)
    return summary


def _write_dataset(out: Location, records: list[Record], images: dict[str, Location], summary: dict) -> None:
    """Write the dataset into ``out`` (found empty); if a write fails, remove what was written,
    so the same import can be run again."""
    existed = out.exists()
    try:
        for record in records:
            out.join(IMAGES_DIR, record.image_name + IMAGE_EXT).write_bytes(images[record.image_name].read_bytes())
        out.join(CSV_NAME).write_text(write_csv(records))
        out.join(AGREEMENT).write_text(json.dumps(summary, indent=2))
    except BaseException:
        with contextlib.suppress(OSError):  # keep the write's own error, the one to report
            out.fs.delete_dir_contents(out.path, missing_dir_ok=True)
            if not existed and out.exists():
                out.fs.delete_dir(out.path)
        raise
