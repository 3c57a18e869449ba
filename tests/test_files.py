"""Reading back the tool's own files: bounded, strict, limited, typed; written atomically."""

from __future__ import annotations

import threading

import pytest
from pydantic import BaseModel

from fpc_ray.errors import UserError, printable
from fpc_ray.files import MAX_DEPTH, parse_json, read_json, temporary_name, write_atomic
from fpc_ray.storage import resolve


@pytest.mark.parametrize(("data", "why"), [
    (b"", "empty"),
    (b'{"a": 1', "not valid JSON"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_DEPTH}"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH}"),
    (b'{"n": ' + b"9" * 5000 + b"}", "an integer of 5000 digits"),
    (b'{"n": -' + b"9" * 65 + b"}", "an integer of 65 digits"),
])
def test_damaged_json_is_one_line_naming_the_file(data, why):
    with pytest.raises(UserError) as e:
        parse_json(data, "/x/_SUCCESS.json", "run marker")
    assert str(e.value).startswith("/x/_SUCCESS.json: damaged run marker: ") and why in str(e.value)
    assert "\n" not in str(e.value)


def test_sound_json_parses_with_a_bom_and_large_floats():
    assert parse_json(b'\xef\xbb\xbf{"a": [1, 2.5e300, null]}', "f") == {"a": [1, 2.5e300, None]}
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "f") is not None


class _Marker(BaseModel):
    run_id: str
    objects: int


def test_read_json_validates_into_a_model(tmp_path):
    loc = resolve(tmp_path / "m.json")
    loc.write_bytes(b'{"run_id": "a", "objects": 3}')
    assert read_json(loc, "run marker", _Marker).objects == 3
    loc.write_bytes(b'{"run_id": "a", "objects": "many"}')
    with pytest.raises(UserError, match=r"m.json: damaged run marker: objects: "):
        read_json(loc, "run marker", _Marker)
    loc.write_bytes(b"{}")
    with pytest.raises(UserError, match=r"damaged run marker: run_id: Field required"):
        read_json(loc, "run marker", _Marker)
    loc.write_bytes(b"[]" + b" " * 100)
    with pytest.raises(UserError, match="larger than 10 bytes"):
        read_json(loc, "run marker", _Marker, limit=10)


def test_temporary_names_differ_between_threads_of_one_process():
    names = []
    threads = [threading.Thread(target=lambda: names.append(temporary_name("/p"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and all(n.startswith("/p.tmp-") for n in names)


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    loc = resolve(tmp_path / "f.json")
    write_atomic(loc, b"one")
    write_atomic(loc, b"two")
    assert loc.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_printable_escapes_control_characters():
    assert printable("frame\nerror: forged\x1b[31m\u202e") == "frame\\nerror: forged\\x1b[31m\\u202e"
    assert printable("plain é ü") == "plain é ü"
