import io

import cv2
import numpy as np
import pytest
from PIL import Image

from fpc_ray.config import AugmentConfig
from fpc_ray.data.fetal_planes import CLASS_NAMES, CSV_NAME, parse_csv, read_fetal_planes
from fpc_ray.data.synth import synthesize
from fpc_ray.data.transforms import (
    MAX_PIXELS,
    TooManyPixels,
    decode_image_bytes,
    eval_transform,
    letterbox,
    to_gray_u8,
    train_transform,
)
from fpc_ray.errors import UserError

# Verbatim in the published format: ';'-separated, "Train " with its trailing space.
PUBLISHED_CSV = (
    "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train \n"
    "Patient00001_Plane1_1_of_15;1;Other;Not A Brain;Op. 3;Aloka;1\n"
    "Patient00001_Plane2_2_of_15;1;Fetal brain;Trans-thalamic;Op. 3;Aloka;1\n"
    "Patient00002_Plane3_1_of_2;2;Maternal cervix;Not A Brain;Other;Voluson E6;0\n"
    "Patient00003_Plane4_1_of_1;3;Fetal femur;Not A Brain;Op. 1;Voluson S10;1\n"
)


def test_reads_published_header_with_trailing_space():
    records = parse_csv(PUBLISHED_CSV)
    assert [r.plane for r in records] == ["Other", "Fetal brain", "Maternal cervix", "Fetal femur"]
    assert records[0].image_name == "Patient00001_Plane1_1_of_15"
    assert [r.official_train for r in records] == [True, True, False, True]
    assert records[1].brain_plane == "Trans-thalamic"
    assert records[2].label == CLASS_NAMES.index("Maternal cervix")


def test_reads_bom_and_crlf(tmp_path):
    (tmp_path / CSV_NAME).write_bytes(b"\xef\xbb\xbf" + PUBLISHED_CSV.replace("\n", "\r\n").encode())
    db = read_fetal_planes(str(tmp_path))
    assert len(db.records) == 4 and len(db.fingerprint) == 64


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty file"),
        (PUBLISHED_CSV.replace(";", ","), "missing column"),
        (PUBLISHED_CSV.replace("Fetal femur", "Fetal heart"), "line 5: unknown Plane 'Fetal heart'"),
        (PUBLISHED_CSV.replace("Aloka;1\n", "Aloka;yes\n", 1), "line 2: Train must be 0 or 1"),
        (PUBLISHED_CSV.replace(";2;", ";two;"), "line 4: Patient_num is not an integer"),
        (PUBLISHED_CSV.splitlines()[0] + "\n", "no rows"),
    ],
)
def test_csv_errors_name_the_line(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_csv(text)


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no FETAL_PLANES_DB_data.csv here"):
        read_fetal_planes(str(tmp_path))


def test_splits_are_patient_disjoint(phantom_dir):
    db = read_fetal_planes(phantom_dir)
    splits = {name: db.split(name, 0.2, seed=1) for name in ("train", "val", "test")}
    patients = {name: {r.patient for r in recs} for name, recs in splits.items()}
    assert all(patients.values())
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(r) for r in splits.values()) == len(db.records)
    assert all(not r.official_train for r in splits["test"])
    assert all(r.official_train for r in splits["train"] + splits["val"])
    # A different seed draws other validation patients, from the same train patients.
    other = {r.patient for r in db.split("val", 0.2, seed=2)}
    assert other <= patients["train"] | patients["val"]


def test_synth_layout_is_the_published_one(tmp_path):
    records = synthesize(str(tmp_path), per_class=3, seed=5, width=160, height=120)
    header = (tmp_path / CSV_NAME).read_text().splitlines()[0]
    assert header == "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "
    assert sorted(p.stem for p in (tmp_path / "Images").glob("*.png")) == sorted(r.image_name for r in records)
    assert {r.plane for r in records} == set(CLASS_NAMES)
    img = cv2.imread(str(tmp_path / "Images" / (records[0].image_name + ".png")), cv2.IMREAD_UNCHANGED)
    assert img.shape == (120, 160) and img.dtype == np.uint8
    # Train is a property of the patient.
    by_patient = {}
    for r in records:
        by_patient.setdefault(r.patient, set()).add(r.official_train)
    assert all(len(v) == 1 for v in by_patient.values())
    # Deterministic in the seed.
    again = tmp_path / "again"
    synthesize(str(again), per_class=3, seed=5, width=160, height=120)
    assert (again / CSV_NAME).read_text() == (tmp_path / CSV_NAME).read_text()
    name = records[-1].image_name + ".png"
    assert (again / "Images" / name).read_bytes() == (tmp_path / "Images" / name).read_bytes()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_gray_rgb_rgba_16bit_palette():
    gray = (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)
    assert np.array_equal(decode_image_bytes(_png(gray)), gray)
    rgb = np.stack([gray] * 3, axis=-1)
    assert np.abs(decode_image_bytes(_png(rgb)).astype(int) - gray).max() <= 1
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 255, np.uint8)], axis=-1)
    assert decode_image_bytes(_png(rgba)).shape == (48, 64)
    deep = gray.astype(np.uint16) * 257
    assert np.abs(decode_image_bytes(_png(deep)).astype(int) - gray).max() <= 1
    pal = Image.fromarray(gray).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image_bytes(buf.getvalue()).shape == (48, 64)
    _, jpg = cv2.imencode(".jpg", gray)
    assert decode_image_bytes(jpg.tobytes()).shape == (48, 64)


def test_one_pixel_limit_for_training_and_labelling_without_touching_pils_global():
    """A header claiming 9000x8000 (72 MP): over MAX_PIXELS, under what PIL refuses by itself, so
    only the limit checked before decoding stops it; the training and the labelling decoder alike."""
    from fpc_ray.label.decode import DecodeError, decode_object
    from tests.fixtures_archive import png_bomb

    assert 9000 * 8000 > MAX_PIXELS
    with pytest.raises(TooManyPixels, match=f"9000x8000 pixels exceeds the limit of {MAX_PIXELS}"):
        decode_image_bytes(png_bomb(9000, 8000))
    with pytest.raises(DecodeError) as err:
        decode_object("big.png", png_bomb(9000, 8000))
    assert str(err.value) == f"too_large: 9000x8000 pixels exceeds the limit of {MAX_PIXELS}"
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL's own default: no import changed it


def test_to_gray_rejects_odd_shapes():
    with pytest.raises(ValueError):
        to_gray_u8(np.zeros((4, 4, 2), np.uint8))


def test_letterbox_keeps_aspect_and_centres():
    img = np.full((50, 100), 200, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64)
    assert out[0].max() == 0 and out[-1].max() == 0  # padded top and bottom
    assert out[32].min() == 200  # full width in the middle


def test_model_input_is_albumentations_normalisation():
    """Bundles trained when eval went through albumentations see the same tensors now."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = A.Compose([A.ToRGB(num_output_channels=3), A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
                           ToTensorV2()])
    img = (np.random.default_rng(1).random((48, 64)) * 255).astype(np.uint8)
    want, got = reference(image=img)["image"], eval_transform(mean, std)(image=img)["image"]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got - want).abs().max()) < 1e-5


def test_eval_and_train_transforms_give_three_equal_normalised_channels():
    img = letterbox((np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8), 64)
    x = eval_transform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(image=img)["image"]
    assert tuple(x.shape) == (3, 64, 64)
    assert float(x.min()) >= -1.0001 and float(x.max()) <= 1.0001
    assert (x[0] == x[1]).all() and (x[1] == x[2]).all()
    t = train_transform(AugmentConfig(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), seed=0)
    y = t(image=img)["image"]
    assert tuple(y.shape) == (3, 64, 64)
    # Seeded: the same draw twice.
    t2 = train_transform(AugmentConfig(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), seed=0)
    assert (t2(image=img)["image"] == y).all()
