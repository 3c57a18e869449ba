"""The Label Studio formats a review batch speaks, and the spreadsheet beside them.

- The labelling config: the frame as an ``<Image>``, the six planes as single ``<Choices>``
  named ``plane`` (required, with an ``Unsure`` choice), the brain sub-plane as an optional
  second ``<Choices>`` named ``brain_plane``.
- Import tasks (Label Studio's basic JSON format): ``{"data": {...}, "predictions": [...]}``,
  the model's label as a pre-annotation with its score and model version.
- The JSON export: a list of tasks, each with ``annotations[]`` holding ``result[]`` items
  (``from_name``, ``to_name``, ``type: choices``, ``value.choices``) and ``was_cancelled``.
- The JSON-MIN export: a list of flat entries, the task data (``frame_id``) beside the choices
  (``plane``, ``brain_plane``) by control name.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from fpc_ray.data.fetal_planes import BRAIN_PLANES, CLASS_NAMES
from fpc_ray.errors import UserError, printable, shorten
from fpc_ray.files import parse_json

IMAGE = "image"          # the <Image> tag's name, and the task data key it shows ($image)
PLANE = "plane"          # the <Choices> of the six planes
BRAIN_PLANE = "brain_plane"  # the optional brain sub-plane
UNSURE = "Unsure"
CSV_COLUMNS = ("frame_id", "source_uri", "frame", "study_uid", "predicted", "confidence", "label",
               "brain_plane")
MAX_FRAME_DIGITS = 9  # a frame index; a cine has at most thousands of frames
SHOWN_CHARS = 120     # of a value quoted in an error: enough to recognise it, never a page


def shown(value: object) -> str:
    """``value`` quoted for an error line: its ``repr`` with control characters escaped, cut short."""
    return shorten(printable(repr(value)), SHOWN_CHARS)


def frame_named(where: str, frame_id: str) -> str:
    """``where`` naming its frame, as every message about an answer does; the id escaped, since it
    is whatever the export says (a newline in it would forge a second line), and cut short."""
    return f"{where} (frame {shorten(printable(frame_id), SHOWN_CHARS)})"


@dataclass(frozen=True)
class Answer:
    """A reviewer's answer for one frame: ``plane`` is a class name, ``Unsure``, or None when the
    frame was skipped (a cancelled annotation, none at all, or an empty CSV cell)."""

    where: str       # "tasks.json entry 3" or "tasks.csv line 4": named in errors
    frame_id: str
    plane: str | None
    brain_plane: str | None
    # Where the CSV gives them: the frame's object and index, which name the frame when a
    # spreadsheet turned an all-digit frame_id into a number (1.23457E+15).
    source_uri: str | None = None
    frame: str | None = None


def labeling_config() -> str:
    """The project's labelling config (XML)."""
    def choices(values):
        return "\n".join(f"    <Choice value={quoteattr(v)}/>" for v in values)

    return (f'<View>\n  <Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>\n'
            f'  <Header value="Plane"/>\n'
            f'  <Choices name="{PLANE}" toName="{IMAGE}" choice="single" required="true" showInline="true">\n'
            f"{choices([*CLASS_NAMES, UNSURE])}\n  </Choices>\n"
            f'  <Header value="Brain plane (optional)"/>\n'
            f'  <Choices name="{BRAIN_PLANE}" toName="{IMAGE}" choice="single" showInline="true">\n'
            f"{choices(BRAIN_PLANES)}\n  </Choices>\n</View>\n")


def task(row: dict, image_url: str) -> dict:
    """One import task: the frame, what identifies it, and the model's label as a prediction."""
    return {
        "data": {IMAGE: image_url, "frame_id": row["frame_id"], "source_uri": row["source_uri"],
                 "frame": row["frame"], "study_uid": row["study_uid"], "predicted": row["label"],
                 "confidence": round(float(row["confidence"]), 4)},
        "predictions": [{
            "model_version": row["model_version"],
            "score": round(float(row["confidence"]), 4),
            "result": [{"from_name": PLANE, "to_name": IMAGE, "type": "choices",
                        "value": {"choices": [row["label"]]}}],
        }],
    }


def tasks_csv(rows: list[dict]) -> str:
    """The spreadsheet: one row a frame, ``label`` and ``brain_plane`` left empty to fill in."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["frame_id"], r["source_uri"], r["frame"], r["study_uid"] or "", r["label"],
                         f"{float(r['confidence']):.4f}", "", ""])
    return out.getvalue()


def _choice(result: list, name: str, where: str) -> str | None:
    """The single choice of control ``name`` in an annotation's result, or None. Two results for
    one control that differ are refused: neither is the reviewer's answer more than the other."""
    if not all(isinstance(item, dict) for item in result):
        bad = next(item for item in result if not isinstance(item, dict))
        raise UserError(f"{where}: an item of the annotation's 'result' is not an object, got {shown(bad)}")
    found = set()
    for item in result:
        if item.get("from_name") != name:
            continue
        value = item.get("value")
        values = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
            raise UserError(f"{where}: '{name}' must hold exactly one choice, got {shown(values)}")
        found.add(values[0])
    if len(found) > 1:
        raise UserError(f"{where}: one annotation holds {len(found)} different '{name}' results: "
                        f"{', '.join(shown(v) for v in sorted(found))}")
    return found.pop() if found else None


def _answered(annotations: object, where: str) -> list[dict]:
    """The annotations not cancelled (skipped): ``was_cancelled`` is a JSON boolean, or absent
    (not cancelled); anything else (``"false"``, a string, is true to Python) is refused. Each
    answer is one of its own: reviewers who disagree on a task are a conflict for import to
    name, never settled by who answered last."""
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise UserError(f"{where}: 'annotations' is not a list of objects")
    for a in annotations:
        if not isinstance(a.get("was_cancelled", False), bool):
            raise UserError(f"{where}: 'was_cancelled' must be true or false, got {shown(a['was_cancelled'])}")
    return [a for a in annotations if not a.get("was_cancelled", False)]


def _min_choice(entry: dict, name: str, where: str) -> str | None:
    """A choice in a JSON-MIN entry: a string, or ``{"choices": [one]}``; None when not given."""
    value = entry.get(name)
    if isinstance(value, dict):
        value = value.get("choices")
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: '{name}' must hold exactly one choice, got {shown(value)}")
    return value or None


def _task_answers(t: object, where: str) -> list[Answer]:
    """The answers of one exported task: one per annotation not cancelled (one empty answer when
    none is left), or the one a JSON-MIN entry (flat: ``frame_id``, ``plane``) holds."""
    if isinstance(t, dict) and "data" not in t and isinstance(t.get("frame_id"), str):
        where = frame_named(where, t["frame_id"])
        return [Answer(where, t["frame_id"], _min_choice(t, PLANE, where), _min_choice(t, BRAIN_PLANE, where))]
    data = t.get("data") if isinstance(t, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("frame_id"), str):
        raise UserError(f"{where}: no data.frame_id (not a task of a review batch)")
    where = frame_named(where, data["frame_id"])
    answers = []
    for annotation in _answered(t.get("annotations", []), where) or [{"result": []}]:
        result = annotation.get("result")
        if not isinstance(result, list):
            raise UserError(f"{where}: the annotation's 'result' is not a list")
        answers.append(Answer(where, data["frame_id"], _choice(result, PLANE, where),
                              _choice(result, BRAIN_PLANE, where)))
    return answers


def parse_export(text: str, name: str) -> list[Answer]:
    """Answers from Label Studio's JSON export (a list of tasks with ``annotations``) or its
    JSON-MIN export (a list of flat entries).

    Raises:
        UserError: malformed JSON (nested too deep or with a number too long included), or an
            entry that is not a task of a review batch.
    """
    tasks = parse_json(text, name, "Label Studio export")
    if not isinstance(tasks, list):
        raise UserError(f"{name}: expected Label Studio's JSON export, a list of tasks")
    return [a for i, t in enumerate(tasks, start=1) for a in _task_answers(t, f"{name} entry {i}")]


def _delimiter(header_line: str) -> str:
    """The CSV's delimiter: the one of ``,``, ``;`` (Excel in locales with a decimal comma) and tab
    that splits the header into the columns import needs."""
    for delimiter in (",", ";", "\t"):
        if {"frame_id", "label"} <= {h.strip() for h in header_line.split(delimiter)}:
            return delimiter
    return ","


def parse_filled_csv(text: str, name: str) -> list[Answer]:
    """Answers from the filled ``tasks.csv`` (``,``, ``;`` or tab separated; ``frame_id`` and
    ``label`` columns, ``brain_plane`` optional; an empty ``label`` is a skipped frame). Cells
    missing at the end of a row after ``frame_id`` and ``label`` count as empty (spreadsheets drop
    trailing empty cells).

    Raises:
        UserError: a missing column or a row with too many or too few fields.
    """
    try:
        rows = list(csv.reader(io.StringIO(text), delimiter=_delimiter(text.split("\n", 1)[0])))
    except csv.Error as e:
        raise UserError(f"{name}: not a valid CSV file ({e})") from None
    if not rows:
        raise UserError(f"{name}: empty file")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("frame_id", "label") if c not in header]
    if missing:
        raise UserError(f"{name}: missing column(s) {', '.join(missing)} (expected the batch's tasks.csv, filled)")
    col = {c: header.index(c) for c in header}
    needed = max(col["frame_id"], col["label"]) + 1
    answers = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if not needed <= len(row) <= len(header):
            raise UserError(f"{name} line {lineno}: expected {len(header)} fields, got {len(row)}")
        row = row + [""] * (len(header) - len(row))
        fid = row[col["frame_id"]].strip()
        where = frame_named(f"{name} line {lineno}", fid)
        brain = row[col["brain_plane"]].strip() if "brain_plane" in col else ""
        source = {c: row[col[c]].strip() or None for c in ("source_uri", "frame") if c in col}
        answers.append(Answer(where, fid, row[col["label"]].strip() or None, brain or None,
                              source.get("source_uri"), _frame_index(source.get("frame"), where)))
    return answers


def _frame_index(cell: str | None, where: str) -> str | None:
    """The CSV's ``frame`` cell: a frame index (digits, as the batch wrote it), or None when empty."""
    if cell is not None and not (cell.isascii() and cell.isdigit() and len(cell) <= MAX_FRAME_DIGITS):
        raise UserError(f"{where}: 'frame' must be a frame index (at most {MAX_FRAME_DIGITS} digits), "
                        f"got {shown(cell)}")
    return cell
