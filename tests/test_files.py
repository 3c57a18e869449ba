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


def test_pointer_compare_and_swap_has_one_winner_among_threads(tmp_path):
    """Writers sharing a pid (threads here; containers that are each PID 1 on one volume) each
    read the pointer and swap it: one wins, the others are told it moved, none dies on another's
    temporary, and the pointer names the winner's bundle."""
    from fpc_ray.bundle import read_pointer, read_pointer_state, write_pointer
    from fpc_ray.errors import ConcurrentChange

    uri = str(tmp_path / "production.json")
    write_pointer(uri, {"bundle": "start"})
    start = threading.Barrier(8)
    outcome: dict[str, str] = {}

    def swap(name: str) -> None:
        state = read_pointer_state(uri)
        start.wait()
        try:
            write_pointer(uri, {"bundle": name}, expected=state)
            outcome[name] = "won"
        except ConcurrentChange:
            outcome[name] = "moved"
        except Exception as e:  # noqa: BLE001 - what the test is about
            outcome[name] = repr(e)

    threads = [threading.Thread(target=swap, args=(f"b{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, o in outcome.items() if o == "won"]
    assert len(winners) == 1 and sorted(outcome.values()) == ["moved"] * 7 + ["won"], outcome
    assert read_pointer(uri)["bundle"] == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["production.json", "production.json.lock"]


def _parquet(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"frame_id": [f"f{i}" for i in range(200)]}), path)
    data = path.read_bytes()
    path.write_bytes(damage(data))
    return resolve(path)


def _in_footer(data: bytes) -> bytes:
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer
    return data[:start + 4] + b"\xff" * 8 + data[start + 12:]


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: b"", lambda d: bytes(range(256)) * 3,
                                    _in_footer], ids=["cut", "empty", "random", "footer"])
def test_a_damaged_parquet_is_one_line_naming_it(tmp_path, damage):
    from fpc_ray.files import DamagedFile, read_parquet

    loc = _parquet(tmp_path, damage)
    with pytest.raises(DamagedFile) as e:
        read_parquet(loc, "review manifest")
    assert str(e.value).startswith(f"{loc.uri}: damaged review manifest: ") and "\n" not in str(e.value)


def test_parquet_storage_errors_stay_storage_errors(tmp_path):
    from fpc_ray.errors import StorageUnavailable
    from fpc_ray.files import DamagedFile, damaged_parquet, read_parquet

    with pytest.raises(UserError, match="not found") as e:
        read_parquet(resolve(tmp_path / "none.parquet"), "index")
    assert not isinstance(e.value, DamagedFile)
    outage = OSError("When reading information for key 'a' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                     "HeadObject operation: curlCode: 7, Couldn't connect to server")
    assert isinstance(damaged_parquet("s3://b/a", "index", outage), StorageUnavailable)
    thrift = OSError("Couldn't deserialize thrift: TProtocolException: Invalid data")
    assert isinstance(damaged_parquet("s3://b/a", "index", thrift), DamagedFile)
