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
