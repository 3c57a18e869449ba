"""Labelling defects an adversarial probe found: header values in logs, an output inside its
input, damaged run files, unreadable folders, default run ids of one second, sniffed formats."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest

from fpc_ray.label.decode import decode_object
from tests import fixtures_archive as fx

GRAY = (np.add.outer(np.arange(48), np.arange(64)) * 2 % 256).astype(np.uint8)
FREE_TEXT_UID = "DOE^JANE MRN8675309"


def _padded(data: bytes) -> bytes:
    """A DICOM whose pixel data carries more bytes than its rows and columns need."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.PixelData + bytes(128)
    return fx._bytes(ds)


@pytest.mark.parametrize("make", [
    lambda: fx.dicom_uid_holding(GRAY, "StudyInstanceUID", FREE_TEXT_UID),
    lambda: fx._patched(fx.dicom_uid_holding(GRAY, "SeriesInstanceUID", FREE_TEXT_UID), NumberOfFrames=0),
    lambda: _padded(fx.dicom_uid_holding(GRAY, "StudyInstanceUID", FREE_TEXT_UID)),
], ids=["uid_free_text", "zero_frames", "padded"])
def test_no_dicom_header_value_reaches_a_warning_or_a_log(make, caplog, capfd):
    data = make()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        decoded = decode_object("study.dcm", data)
    assert len(decoded.frames) == 1 and None in decoded.uids.values()  # the free-text UID is dropped
    out, err = capfd.readouterr()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + [out, err]
    assert not any(FREE_TEXT_UID in s or "DOE" in s for s in said), said
    assert not [w for w in caught if "pydicom" in w.filename], [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


def test_pydicom_settings_are_restored_after_decoding():
    import pydicom.config

    before = (pydicom.config.settings.reading_validation_mode, list(warnings.filters),
              list(logging.getLogger("pydicom").filters))
    decode_object("study.dcm", fx.dicom_uid_holding(GRAY, "StudyInstanceUID", FREE_TEXT_UID))
    assert (pydicom.config.settings.reading_validation_mode, list(warnings.filters),
            list(logging.getLogger("pydicom").filters)) == before


@pytest.mark.parametrize("inputs, output, overlap", [
    (["arch"], "arch/labels", True),
    (["arch/"], "arch", True),
    (["arch/sub"], "arch", True),  # an input inside the output
    (["other", "arch"], "./arch/../arch/labels/", True),
    (["link"], "arch/labels", True),  # the same folder through a symlink
    (["arch"], "archive-labels", False),  # a shared name prefix is not nesting
    (["arch"], "labels", False),
])
def test_an_output_overlapping_an_input_is_refused_locally(tmp_path, monkeypatch, inputs, output, overlap):
    from fpc_ray.errors import UserError
    from fpc_ray.label.pipeline import _refuse_overlap
    from fpc_ray.storage import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "arch" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "arch")
    sources = [resolve(u) for u in inputs]
    if overlap:
        with pytest.raises(UserError, match="overlap") as e:
            _refuse_overlap(sources, resolve(output))
        assert "\n" not in str(e.value)
    else:
        _refuse_overlap(sources, resolve(output))


@pytest.mark.parametrize("inputs, output, overlap", [
    (["s3://bucket"], "s3://bucket/labels", True),
    (["s3://bucket/arch/"], "s3://bucket/arch//labels", True),
    (["s3://bucket/arch/labels"], "s3://bucket/arch/", True),
    (["s3://bucket/arch"], "s3://bucket/archive", False),
    (["s3://bucket/arch"], "s3://other/arch/labels", False),
    (["s3://bucket/arch"], "/bucket/arch/labels", False),  # local and remote never nest
])
def test_an_output_overlapping_an_input_is_refused_on_s3(inputs, output, overlap):
    import pyarrow.fs as pafs

    from fpc_ray.errors import UserError
    from fpc_ray.label.pipeline import _refuse_overlap
    from fpc_ray.storage import resolve

    fs = pafs.LocalFileSystem()  # only the paths matter: nothing is read
    sources = [resolve(u, filesystem=fs) for u in inputs]
    if overlap:
        with pytest.raises(UserError, match="overlap"):
            _refuse_overlap(sources, resolve(output, filesystem=fs))
    else:
        _refuse_overlap(sources, resolve(output, filesystem=fs))


def test_label_refuses_an_output_inside_its_input_before_writing(trained_bundle, tmp_path):
    from fpc_ray.errors import UserError
    from fpc_ray.label.pipeline import LabelOptions, run_labelling

    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "a.png").write_bytes(fx.png(GRAY))
    with pytest.raises(UserError, match="overlap"):
        run_labelling(trained_bundle["bundle"], str(tmp_path / "arch"), str(tmp_path / "arch" / "labels"),
                      LabelOptions(), echo=lambda _: None)
    assert not (tmp_path / "arch" / "labels").exists()
