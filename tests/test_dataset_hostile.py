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
from fpc_ray.data.transforms import decode_image_bytes, png_significant_bits
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


def _png16(array: np.ndarray, sbit: bytes | None = None) -> bytes:
    """``array`` (uint16; HxW gray or HxWx3 BGR) as a 16-bit PNG, with an ``sBIT`` chunk of
    ``sbit`` inserted before the image data where given."""
    import struct
    import zlib

    import cv2

    png = cv2.imencode(".png", array)[1].tobytes()
    if sbit is None:
        return png
    chunk = struct.pack(">I", len(sbit)) + b"sBIT" + sbit
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + sbit))
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def test_12_bit_data_in_a_16_bit_png_comes_out_full_range():
    ramp = np.linspace(0, 4080, 64 * 48).reshape(48, 64).astype(np.uint16)  # a 12-bit scanner's range
    gray = decode_image_bytes(_png16(ramp))
    assert gray.max() == round(4080 * 255 / 4095) and gray.min() == 0
    assert np.array_equal(gray, np.round(ramp * (255 / 4095)).astype(np.uint8))
    color = decode_image_bytes(_png16(np.dstack([ramp] * 3)))  # PIL alone keeps the high byte: 0..15
    assert np.abs(color.astype(int) - gray).max() <= 1


def test_a_declared_bit_depth_wins_over_the_inferred_one():
    ramp = np.linspace(0, 1000, 64 * 48).reshape(48, 64).astype(np.uint16)
    assert decode_image_bytes(_png16(ramp)).max() == round(1000 * 255 / 4095)  # taken for 12-bit data
    declared = decode_image_bytes(_png16(ramp, sbit=b"\x0a"))  # sBIT: 10 significant bits
    assert declared.max() == round(1000 * 255 / 1023)
    assert png_significant_bits(_png16(np.dstack([ramp] * 3), sbit=b"\x0a\x0c\x0b")) == 12
    hostile = decode_image_bytes(_png16(ramp, sbit=b"\xc8"))  # 200 bits: no more than the container's 16
    assert hostile.max() == round(1000 * 255 / 65535)


def test_a_pixel_s_brightness_does_not_follow_the_brightest_pixel():
    """A 16-bit export of an 8-bit image (x257): the same pixels whatever its brightest one."""
    dim = (np.arange(64, dtype=np.uint16).reshape(8, 8) + 60) * 257  # 60..123, x257
    bright = dim.copy()
    bright[0, 0] = 65535
    a, b = decode_image_bytes(_png16(dim)), decode_image_bytes(_png16(bright))
    assert np.array_equal(a.ravel()[1:], b.ravel()[1:]) and a[0, 1] == 61


def test_deep_images_stay_black_where_black_and_8_bit_data_is_unchanged():
    assert decode_image_bytes(_png16(np.zeros((8, 8), np.uint16))).max() == 0
    small = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 8-bit values in a 16-bit container
    assert np.array_equal(decode_image_bytes(_png16(small)), small.astype(np.uint8))
    full = np.full((8, 8), 65535, np.uint16)
    assert decode_image_bytes(_png16(full)).min() == 255


def test_a_quote_left_open_is_refused_not_swallowing_the_rows_after_it():
    rows = [_row("a", 1, 1), _row("b", 1, 1).replace("Voluson E6", '"Voluson E6'), _row("c", 2, 0), _row("d", 3, 0)]
    with pytest.raises(UserError, match="line 3: a field runs over several lines"):
        parse_csv(HEADER + "\n".join(rows) + "\n")


def test_a_csv_with_old_mac_line_ends_reads_like_any_other(tmp_path):
    text = (HEADER + _row("a", 1, 1) + "\n" + _row("b", 2, 0) + "\n").replace("\r\n", "\n").replace("\n", "\r")
    assert [r.image_name for r in parse_csv(text)] == ["a", "b"]
