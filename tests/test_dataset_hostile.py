"""Hostile datasets: what a spreadsheet, a careless export or a deep-image scanner hands the reader.

Every case is hand-written into ``tmp_path``: no Ray, no S3 server, no training.
"""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.data.dataset import decode_split
from fpc_ray.data.fetal_planes import CSV_NAME, parse_csv, read_fetal_planes
from fpc_ray.errors import UserError

HEADER = "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train \n"


def _dataset(root, rows: list[str], images: dict[str, Image.Image] | None = None):
    """A dataset at ``root``: the CSV of ``rows`` and ``Images/<file name>`` for each image given."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / CSV_NAME).write_text(HEADER + "".join(r + "\n" for r in rows))
    for name, image in (images or {}).items():
        image.save(root / "Images" / name, format="PNG")
    return root


def test_synth_refuses_an_existing_dataset_without_overwrite(tmp_path):
    real = _dataset(tmp_path, ["Patient00001_Plane1_1_of_6;1;Fetal brain;Trans-thalamic;Op. 1;Voluson E6;1"],
                    {"Patient00001_Plane1_1_of_6.png": Image.new("L", (10, 10), 7)})
    before = {p: p.read_bytes() for p in (real / CSV_NAME, real / "Images" / "Patient00001_Plane1_1_of_6.png")}
    result = CliRunner().invoke(app, ["synth", str(real), "--per-class", "1", "--width", "64", "--height", "64"])
    assert result.exit_code == 2
    assert "already holds a dataset" in result.output and "--overwrite" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before
    result = CliRunner().invoke(app, ["synth", str(real), "--per-class", "1", "--width", "64", "--height", "64",
                                      "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (real / CSV_NAME).read_bytes() != before[real / CSV_NAME]


def test_synth_writes_into_a_folder_holding_no_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "Images").mkdir()  # an empty Images/ holds nothing to lose
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--per-class", "1", "--width", "64", "--height", "64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / CSV_NAME).exists() and (tmp_path / "notes.txt").read_text() == "kept"


def _row(name: str, patient: int, train: int, plane: str = "Other") -> str:
    return f"{name};{patient};{plane};Not A Brain;Op. 1;Voluson E6;{train}"


def test_an_exact_duplicate_row_counts_once():
    rows = [_row("a", 1, 1), _row("b", 1, 1), _row("c", 2, 0), _row("a", 1, 1)]
    records = parse_csv(HEADER + "\n".join(rows) + "\n")
    assert [r.image_name for r in records] == ["a", "b", "c"]


@pytest.mark.parametrize(("again", "column"), [
    (_row("a", 1, 0), "Train"),
    (_row("a", 1, 1, plane="Fetal femur"), "Plane"),
    (_row("a", 3, 1), "Patient_num"),
])
def test_an_image_listed_twice_differently_is_refused_naming_it(again, column):
    rows = [_row("a", 1, 1), _row("b", 2, 0), again]
    with pytest.raises(UserError, match=rf"line 4: image 'a' is listed again \(first on line 2\) "
                                        rf"with a different {column}") as err:
        parse_csv(HEADER + "\n".join(rows) + "\n")
    assert "\n" not in str(err.value)


def test_a_patient_in_both_official_splits_is_refused_naming_the_patient():
    rows = [_row("a", 7, 1), _row("b", 7, 0), _row("c", 2, 0)]
    with pytest.raises(UserError, match="patient 7 is in both the official train and test splits"):
        parse_csv(HEADER + "\n".join(rows) + "\n")


def test_synth_output_and_bench_copies_read_as_patient_disjoint(tmp_path):
    from fpc_ray.bench.archives import expand_dataset
    from fpc_ray.data.synth import synthesize

    synthesize(str(tmp_path / "synth"), per_class=4, seed=3, width=64, height=64)
    expanded = expand_dataset(str(tmp_path / "synth"), str(tmp_path / "expanded"), images=60)
    assert len(read_fetal_planes(expanded).records) == 60


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1", "utf-16", "utf-8-sig"])
def test_reads_the_encodings_spreadsheets_save(tmp_path, encoding):
    text = HEADER + _row("a", 1, 1).replace("Op. 1", "Opérateur") + "\n" + _row("b", 2, 0) + "\n"
    (tmp_path / CSV_NAME).write_bytes(text.encode(encoding))  # Python's utf-16 writes the byte-order mark
    records = read_fetal_planes(str(tmp_path)).records
    assert [r.operator for r in records] == ["Opérateur", "Op. 1"]


def test_bytes_of_no_known_encoding_are_one_line(tmp_path):
    # 0x81 starts no UTF-8 sequence and is undefined in Windows-1252.
    (tmp_path / CSV_NAME).write_bytes(HEADER.encode() + b"a;1;Other;\x81\x8d;Op. 1;Aloka;1\n")
    with pytest.raises(UserError, match=r"FETAL_PLANES_DB_data.csv: not text in UTF-8, UTF-16 \(with a "
                                        r"byte-order mark\) or Windows-1252") as err:
        read_fetal_planes(str(tmp_path))
    assert "\n" not in str(err.value)


def _gray(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40), dtype=np.uint8))


def test_names_given_with_the_extension_and_uppercase_png_files_are_found(tmp_path):
    root = _dataset(tmp_path, [_row("a.png", 1, 1), _row("b.PNG", 1, 1), _row("c", 2, 0)],
                    {"a.png": _gray(0), "b.png": _gray(1), "c.PNG": _gray(2)})
    db = read_fetal_planes(str(root))
    assert [r.image_name for r in db.records] == ["a", "b", "c"]
    arrays = decode_split(db, db.records, 32, threads=1)
    assert [int(a.max()) > 0 for a in arrays.images] == [True, True, True]
    assert db.read_image(db.records[2])[0].uri.endswith("c.PNG")


def test_a_missing_image_names_the_file_and_the_csv_name(tmp_path):
    root = _dataset(tmp_path, [_row("a", 1, 1)])
    db = read_fetal_planes(str(root))
    with pytest.raises(UserError, match=r"not found: .*Images/a\.png \(nor a\.PNG\), the image of the CSV's "
                                        r"Image_name 'a'"):
        decode_split(db, db.records, 32, threads=1)


@pytest.mark.parametrize(("header", "hint"), [
    (HEADER.lower(), "column names are case-sensitive: the header has image_name for Image_name"),
    (HEADER.replace(";", ","), "is it ';'-separated? the header has no ';'"),
    (HEADER.replace("Plane;", "View;", 1), "expected the header Image_name;Patient_num;Plane"),
])
def test_a_wrong_header_gets_a_hint_that_says_what_is_wrong(header, hint):
    with pytest.raises(UserError, match="missing column") as err:
        parse_csv(header + _row("a", 1, 1) + "\n")
    assert hint in str(err.value)
    assert "';'-separated" not in str(err.value) or "," in header


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_an_undecodable_image_names_its_path_and_the_problem_without_object_reprs(tmp_path, content):
    root = _dataset(tmp_path, [_row("a", 1, 1)])
    (root / "Images" / "a.png").write_bytes(content)
    db = read_fetal_planes(str(root))
    with pytest.raises(UserError, match=r"Images/a\.png: cannot decode image \(") as err:
        decode_split(db, db.records, 32, threads=1)
    message = str(err.value)
    assert " at 0x" not in message and "BytesIO" not in message
    if not content:
        assert "the file is empty (0 bytes)" in message


@pytest.mark.parametrize("name", ["../../outside", "/etc/passwd", "sub/../../x", "..\\x"])
def test_an_image_name_that_leaves_images_is_refused_naming_the_row(tmp_path, name):
    root = _dataset(tmp_path / "a" / "b", [_row("ok", 1, 1), _row(name, 2, 0)])
    _gray(0).save(tmp_path / "a" / "outside.png")  # where Images/../../outside.png points
    with pytest.raises(UserError, match=r"line 3: Image_name .* leaves Images/"):
        read_fetal_planes(str(root))
