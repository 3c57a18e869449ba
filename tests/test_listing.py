"""The objects a labelling run reads: the listing of local and remote input prefixes."""

from __future__ import annotations

import os

import pytest

from fpc_ray.errors import UserError
from fpc_ray.label.listing import BAD_NAME, list_inputs, list_objects
from fpc_ray.label.schema import error_kind
from fpc_ray.storage import resolve


def test_local_listing_stays_inside_the_prefix_and_survives_loops_and_bad_names(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "secret"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "leak.png").write_bytes(b"x")
    (root / "a" / "b" / "img.png").write_bytes(b"png")
    (root / "out-dir").symlink_to(outside, target_is_directory=True)
    (root / "out-file.png").symlink_to(outside / "leak.png")
    (root / "a" / "b" / "loop").symlink_to(root / "a", target_is_directory=True)
    (root / "alias.png").symlink_to(root / "a" / "b" / "img.png")  # inside: listed under its name
    (root / "0-link").symlink_to(root / "a", target_is_directory=True)  # sorts first; the real path wins
    bad = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(b"x")
    listed = list_objects(resolve(str(root)))
    uris = [o["uri"][len(str(root)) + 1:] for o in listed]
    assert uris == ["a/b/img.png", "alias.png", "caf\\xe9.png"], uris
    errors = {o["uri"][len(str(root)) + 1:]: o["listing_error"] for o in listed}
    assert errors == {"a/b/img.png": None, "alias.png": None, "caf\\xe9.png": BAD_NAME}


def test_overlapping_prefixes_list_each_object_once_and_a_file_prefix_lists_itself(tmp_path):
    (tmp_path / "day" / "study").mkdir(parents=True)
    for name in ("day/a.png", "day/study/b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x" * len(name))
    sources = [resolve(str(tmp_path / "day" / "study")), resolve(str(tmp_path)), resolve(str(tmp_path / "c.png"))]
    listed = list_inputs(sources)
    assert [o["uri"] for o in listed] == [str(tmp_path / n) for n in ("c.png", "day/a.png", "day/study/b.png")]
    assert [o["size"] for o in listed] == [5, 9, 15]
    assert all(o["mtime_ns"] > 0 and o["listing_error"] is None for o in listed)


def test_a_missing_prefix_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such input prefix"):
        list_objects(resolve(str(tmp_path / "nope")))


def test_the_bad_name_listing_error_is_a_declared_kind():
    assert error_kind(BAD_NAME) == "bad_name"


def _scandir_refusing(monkeypatch, refused: str) -> None:
    """os.scandir raising PermissionError for one folder (chmod does not stop root, who runs tests)."""
    real = os.scandir

    def scandir(path):
        if os.fsdecode(path) == refused:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_one_error_row_and_the_rest_is_listed(tmp_path, monkeypatch):
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    (root / "open").mkdir()
    (root / "locked" / "hidden.png").write_bytes(b"x")
    (root / "open" / "a.png").write_bytes(b"x")
    (root / "b.png").write_bytes(b"x")
    _scandir_refusing(monkeypatch, str(root / "locked"))
    listed = {o["uri"][len(str(root)) + 1:]: o for o in list_objects(resolve(str(root)))}
    assert sorted(listed) == ["b.png", "locked", "open/a.png"]
    error = listed["locked"]["listing_error"]
    assert error_kind(error) == "unreadable" and str(root) not in error
    assert listed["locked"]["mtime_ns"] == (root / "locked").stat().st_mtime_ns  # the same key next run
    assert listed["b.png"]["listing_error"] is None and listed["open/a.png"]["listing_error"] is None


def test_an_unreadable_input_prefix_is_still_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    _scandir_refusing(monkeypatch, str(tmp_path / "in"))
    with pytest.raises(UserError, match="permission denied"):
        list_objects(resolve(str(tmp_path / "in")))
