"""Reader for FETAL_PLANES_DB exactly as published (Burgos-Artizzu et al. 2020, Zenodo 3904280).

Layout: ``Images/<Image_name>.png`` and ``FETAL_PLANES_DB_data.csv`` — semicolon separated, header
``Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train `` (note the trailing space
after ``Train``), ``Image_name`` without extension, ``Train`` 1 for the official train split.
Works on a local folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import math
import random
from dataclasses import dataclass, fields
from typing import Literal

from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.storage import Location, resolve

CSV_NAME = "FETAL_PLANES_DB_data.csv"
IMAGES_DIR = "Images"
IMAGE_EXT = ".png"
# Column names as published, the last with its trailing space: the writer reproduces it exactly.
CSV_COLUMNS = ("Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train ")
# The six `Plane` values, in the order the model's outputs use.
CLASS_NAMES = (
    "Fetal abdomen",
    "Fetal brain",
    "Fetal femur",
    "Fetal thorax",
    "Maternal cervix",
    "Other",
)
BRAIN_PLANES = ("Trans-thalamic", "Trans-cerebellum", "Trans-ventricular", "Other", "Not A Brain")

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Record:
    """One row of the CSV."""

    image_name: str
    patient: int
    plane: str
    brain_plane: str
    operator: str
    machine: str
    official_train: bool

    @property
    def label(self) -> int:
        return CLASS_NAMES.index(self.plane)


@dataclass
class FetalPlanesDB:
    """The dataset's records and where its images are."""

    root: Location
    records: list[Record]
    fingerprint: str

    def image_location(self, record: Record) -> Location:
        return self.root.join(IMAGES_DIR, record.image_name + IMAGE_EXT)

    def read_image(self, record: Record) -> tuple[Location, bytes]:
        """Where the record's image is, and its bytes: ``<name>.png``, else ``<name>.PNG`` (as
        some exports name it; looked for only when ``<name>.png`` is absent, so found images
        cost no extra request).

        Raises:
            UserError: neither exists (naming both), or the storage refused the read.
        """
        loc = self.image_location(record)
        try:
            return loc, loc.read_bytes()
        except UserError:
            upper = self.root.join(IMAGES_DIR, record.image_name + IMAGE_EXT.upper())
            if loc.exists():
                raise  # there but unreadable: the storage's own message says why
            if not upper.exists():
                raise UserError(f"not found: {loc.uri} (nor {record.image_name}{IMAGE_EXT.upper()}), the image "
                                f"of the CSV's Image_name {record.image_name!r}") from None
        return upper, upper.read_bytes()

    def split(self, name: Split, val_fraction: float, seed: int = 0) -> list[Record]:
        """The official test split, or the official train split cut by patient into train / val.

        Validation patients are drawn with ``seed`` from the official train patients, so no
        patient ever appears in two splits.
        """
        if name == "test":
            return [r for r in self.records if not r.official_train]
        train = [r for r in self.records if r.official_train]
        patients = sorted({r.patient for r in train})
        random.Random(seed).shuffle(patients)
        n_val = min(len(patients) - 1, math.ceil(val_fraction * len(patients))) if patients else 0
        val_patients = set(patients[:n_val])
        if name == "val":
            return [r for r in train if r.patient in val_patients]
        if name == "train":
            return [r for r in train if r.patient not in val_patients]
        raise UserError(f"unknown split {name!r}: expected train, val or test")


def _parse_bool01(value: str, where: str) -> bool:
    value = value.strip()
    if value not in ("0", "1"):
        raise UserError(f"{where}: Train must be 0 or 1, got {value!r}")
    return value == "1"


def _image_name(value: str, where: str) -> str:
    """``Image_name`` as the published CSV gives it: without the extension (a trailing ``.png``,
    any case, is dropped), and naming a file inside ``Images/``."""
    name = value.strip()
    if name.lower().endswith(IMAGE_EXT):
        name = name[: -len(IMAGE_EXT)]
    if not name:
        raise UserError(f"{where}: Image_name is empty")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"{where}: Image_name {value.strip()!r} leaves {IMAGES_DIR}/; expected a name inside it")
    return name


def _parse_row(row: list[str], col: dict[str, int], where: str) -> Record:
    """One data row as a record, with one-line errors naming the row."""
    plane = row[col["Plane"]].strip()
    if plane not in CLASS_NAMES:
        # Every dataset a model trains or is scored on shares these classes, in this order.
        raise UserError(f"{where}: unknown Plane {plane!r} (expected one of {', '.join(CLASS_NAMES)})")
    try:
        patient = int(row[col["Patient_num"]].strip())
    except ValueError:
        raise UserError(f"{where}: Patient_num is not an integer") from None
    return Record(
        image_name=_image_name(row[col["Image_name"]], where),
        patient=patient,
        plane=plane,
        brain_plane=row[col["Brain_plane"]].strip(),
        operator=row[col["Operator"]].strip(),
        machine=row[col["US_Machine"]].strip(),
        official_train=_parse_bool01(row[col["Train"]], where),
    )


# The CSV column each Record field comes from, for messages about a row.
_COLUMN_OF = dict(zip((f.name for f in fields(Record)), (c.strip() for c in CSV_COLUMNS), strict=True))


def _add_once(records: dict[str, tuple[int, Record]], record: Record, lineno: int, source: str) -> None:
    """Keep ``record`` under its image name; an exact repeat is the same row given twice and counts
    once, a repeat that differs is a contradiction (which label, which split?) and is refused."""
    if record.image_name not in records:
        records[record.image_name] = (lineno, record)
        return
    first_line, first = records[record.image_name]
    differ = [_COLUMN_OF[f.name] for f in fields(Record) if getattr(first, f.name) != getattr(record, f.name)]
    if differ:
        raise UserError(f"{source} line {lineno}: image {record.image_name!r} is listed again (first on line "
                        f"{first_line}) with a different {', '.join(differ)}; keep one row per image")


def _refuse_split_leaks(records: list[Record], source: str) -> None:
    """The official split is patient-disjoint: a patient on both sides would leak into the test."""
    sides: dict[int, set[bool]] = {}
    for r in records:
        sides.setdefault(r.patient, set()).add(r.official_train)
    both = sorted(p for p, s in sides.items() if len(s) == 2)
    if both:
        more = f" (and {len(both) - 1} more patient(s))" if len(both) > 1 else ""
        raise UserError(f"{source}: patient {both[0]} is in both the official train and test splits{more}; "
                        f"the split must be patient-disjoint (set one Train value per patient)")


def _header_hint(names: list[str], missing: list[str]) -> str:
    """What is wrong with a header that lacks ``missing``, as far as can be told."""
    if len(names) == 1 and any(sep in names[0] for sep in (",", "\t")):
        return "is it ';'-separated? the header has no ';'"
    given = {n.lower(): n for n in names}
    recased = [f"{given[m.lower()]} for {m}" for m in missing if m.lower() in given]
    if recased:
        return f"column names are case-sensitive: the header has {', '.join(recased)}"
    return f"expected the header {';'.join(CSV_COLUMNS)}"


def _csv_rows(text: str, source: str):
    """The CSV's rows; line ends of any convention (CR alone: old Mac spreadsheets) are read as one."""
    reader = csv.reader(io.StringIO(text, newline=None), delimiter=";")
    try:
        yield from reader
    except csv.Error as e:
        raise UserError(f"{source} line {reader.line_num}: not readable as CSV ({e})") from None


def parse_csv(text: str, source: str = CSV_NAME) -> list[Record]:
    """Parse the dataset CSV text into records, with one-line errors naming the row.

    A row given twice counts once; an image listed twice differently, or a patient in both
    official splits, is refused.
    """
    reader = _csv_rows(text, source)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{source}: empty file") from None
    names = [h.strip() for h in header]
    wanted = [c.strip() for c in CSV_COLUMNS]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} ({_header_hint(names, missing)})")
    col = {name: names.index(name) for name in wanted}
    by_name: dict[str, tuple[int, Record]] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{source} line {lineno}"
        if any("\n" in c or "\r" in c for c in row):  # the rows after it would vanish into one field
            raise UserError(f"{where}: a field runs over several lines (a '\"' left open?)")
        if len(row) < len(names):
            raise UserError(f"{where}: expected {len(names)} fields, got {len(row)}")
        _add_once(by_name, _parse_row(row, col, where), lineno, source)
    records = [record for _, record in by_name.values()]
    if not records:
        raise UserError(f"{source}: no rows")
    _refuse_split_leaks(records, source)
    return records


def decode_csv(raw: bytes, source: str = CSV_NAME) -> str:
    """The CSV's text as spreadsheets save it: UTF-8 (a byte-order mark or none), UTF-16 with its
    byte-order mark ("Unicode text"), else Windows-1252 (the ANSI code page of Excel on Windows,
    a superset of Latin-1's letters).

    Raises:
        UserError: bytes that are none of these.
    """
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    for encoding in ("utf-16",) if utf16 else ("utf-8-sig", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError):
            return raw.decode(encoding)
    raise UserError(f"{source}: not text in UTF-8, UTF-16 (with a byte-order mark) or Windows-1252; "
                    f"save the CSV as UTF-8")


def read_fetal_planes(uri: str, storage: StorageConfig | None = None) -> FetalPlanesDB:
    """Read the dataset at a local folder or ``s3://`` prefix.

    Raises:
        UserError: when the folder, the CSV or a column is missing or malformed.
    """
    root = resolve(uri, storage)
    csv_loc = root.join(CSV_NAME)
    if not csv_loc.exists():
        raise UserError(f"{uri}: no {CSV_NAME} here; expected the FETAL_PLANES_DB layout")
    raw = csv_loc.read_bytes()
    records = parse_csv(decode_csv(raw, csv_loc.uri), csv_loc.uri)
    return FetalPlanesDB(root=root, records=records, fingerprint=hashlib.sha256(raw).hexdigest())


def write_csv(records: list[Record]) -> str:
    """The CSV text for records, in the published format (used by the phantom generator)."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow(
            [r.image_name, r.patient, r.plane, r.brain_plane, r.operator, r.machine, int(r.official_train)]
        )
    return out.getvalue()
