"""Hostile datasets: what a spreadsheet, a careless export or a deep-image scanner hands the reader.

Every case is hand-written into ``tmp_path``: no Ray, no S3 server, no training.
"""

from PIL import Image
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.data.fetal_planes import CSV_NAME

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
