"""The tool's own files, read back bounded, strict and typed, and written atomically.

Everything fpc-ray writes and later reads again (run markers, model cards, pointers, metrics,
review manifests, indexes, run parts, configs, review exports) can be cut short by a crash, edited
by hand or damaged in transit. Read back here, a damaged file is one :class:`UserError` naming
the file and what is wrong with it (exit 2, nothing written), never a traceback:

- :func:`parse_json` decodes UTF-8 strictly and parses with limits on nesting and integer digits
  (Python's own limits give a ``RecursionError`` or a ``ValueError`` traceback);
- :func:`read_json` reads a bounded file and, with a pydantic ``model``, validates it;
- :func:`read_parquet` reads a Parquet file, a damaged one (cut short, not Parquet, damaged
  inside with its magic bytes intact) one line while a storage outage stays an outage;
- :func:`temporary_name` names a writer's temporary file uniquely (process, thread and a random
  part), so writers that share a pid (threads; containers that are each PID 1 on one volume)
  never write into one another's temporary; :func:`write_atomic` renames it into place.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from fpc_ray.errors import UserError, printable
from fpc_ray.storage import Location, guard, is_remote

MAX_JSON_BYTES = 64 * 2**20  # the largest JSON file fpc-ray writes is a card or a search: kilobytes
MAX_DEPTH = 64                # the deepest document fpc-ray writes nests about 6 levels
MAX_INT_DIGITS = 64           # a byte count, a seed or a timestamp fits in 20

M = TypeVar("M", bound=BaseModel)


class DamagedFile(UserError):
    """A file fpc-ray wrote that cannot be read back (cut short, not what it should be): a
    UserError, which a reader of a mere cache (the index) may set aside instead."""


class _TooBig(ValueError):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooBig(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _depth(value: Any) -> int:
    """How deep ``value`` nests lists and dicts, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in node)
    return deepest


def decode_utf8(data: bytes, where: str, what: str = "file") -> str:
    """``data`` as strict UTF-8 (a byte-order mark allowed), or one line saying where it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{where}: damaged {what}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None


def parse_json(data: bytes | str, where: str, what: str = "JSON file") -> Any:
    """The JSON document in ``data``, parsed with limits.

    Raises:
        UserError: ``where: damaged <what>: <why>`` for bytes that are not UTF-8, text that is not
            JSON, nesting deeper than :data:`MAX_DEPTH` or an integer longer than
            :data:`MAX_INT_DIGITS` digits.
    """
    text = decode_utf8(data, where, what) if isinstance(data, bytes | bytearray) else data
    try:
        value = json.loads(text, parse_int=_int)
    except _TooBig as e:
        raise DamagedFile(f"{where}: damaged {what}: {e}") from None
    except json.JSONDecodeError as e:
        why = "empty" if not text.strip() else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise DamagedFile(f"{where}: damaged {what}: {why}") from None
    except (RecursionError, MemoryError):
        raise DamagedFile(f"{where}: damaged {what}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # Python's own integer-digit limit, in a float or elsewhere
        raise DamagedFile(f"{where}: damaged {what}: {printable(str(e))[:200]}") from None
    if _depth(value) > MAX_DEPTH:
        raise DamagedFile(f"{where}: damaged {what}: nested deeper than {MAX_DEPTH} levels")
    return value


def read_bounded(loc: Location, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole file at ``loc``, refused in one line when over ``limit`` bytes (read no further)."""
    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as f:
            data = f.read(limit + 1)
        return data

    data = guard(loc.uri, read)
    if len(data) > limit:
        raise DamagedFile(f"{loc.uri}: damaged {what}: larger than {limit} bytes")
    return data


def validated(value: Any, model: type[M], where: str, what: str) -> M:
    """``value`` validated into ``model``; the first problem as one line."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DamagedFile(f"{where}: damaged {what}: {field}: {printable(first['msg'])}") from None


def read_json(loc: Location, what: str, model: type[BaseModel] | None = None, limit: int = MAX_JSON_BYTES):
    """A JSON file fpc-ray wrote: bounded, strictly decoded, parsed with limits and, with
    ``model``, validated into it. ``what`` names the kind of file in messages (``run marker``)."""
    value = parse_json(read_bounded(loc, what, limit), loc.uri, what)
    return validated(value, model, loc.uri, what) if model is not None else value


def temporary_name(path: str) -> str:
    """A temporary name beside ``path`` that no other writer uses: process id, thread id and a
    random part (two containers can both be PID 1 on one shared volume)."""
    return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"


def write_atomic(loc: Location, data: bytes) -> None:
    """Write ``data`` at ``loc`` so that readers see the old file or the new, never half of one.

    Locally a unique temporary (:func:`temporary_name`) is renamed over the target; on S3 a single
    PUT is atomic already.
    """
    if is_remote(loc.uri):
        loc.write_bytes(data)
        return
    name = temporary_name(loc.path)
    tmp = Location(loc.fs, name, name)
    tmp.write_bytes(data)
    try:
        guard(loc.uri, lambda: os.replace(tmp.path, loc.path))
    except BaseException:
        try:
            os.unlink(tmp.path)
        except OSError:
            pass
        raise


# -- Parquet: run parts, _objects.parquet, _index.parquet, review manifests -------------------------

_OPENING = re.compile(r"^Could not open Parquet input source '[^']*': ")


def parquet_damage(err: BaseException) -> str | None:
    """Why ``err``, raised reading a Parquet file, means the file is damaged (one line), or None
    where it is a storage error (not found, denied, an outage) for :func:`guard` to sort.

    pyarrow says a damaged file in several ways: ``ArrowInvalid`` (magic bytes not found, a file
    of 0 bytes, a footer cut short), ``ArrowTypeError`` or ``ArrowNotImplementedError`` (a
    schema or encoding it cannot read) and a bare ``OSError`` with no errno (``Couldn't
    deserialize thrift``, ``Corrupt snappy compressed data``); a storage error is an ``OSError``
    with an errno, or one that names the S3 request that failed.
    """
    from fpc_ray.storage import is_outage

    if isinstance(err, OSError):
        text = str(err)
        if (isinstance(err, FileNotFoundError | PermissionError) or err.errno is not None or is_outage(err)
                or any(m in text for m in ("AWS Error", "curlCode", "errno"))):
            return None
    elif not isinstance(err, pa.ArrowException):
        return None
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return printable(_OPENING.sub("", lines[0]) if lines else type(err).__name__)[:200]


def damaged_parquet(uri: str, what: str, err: BaseException) -> Exception:
    """The one-line error for a failed read of the Parquet file at ``uri``: ``UserError("<uri>:
    damaged <what>: <why>")`` for a damaged file, else what :func:`guard` makes of a storage error."""
    from fpc_ray.storage import storage_error

    why = parquet_damage(err)
    if why is None:
        return storage_error(uri, err) if isinstance(err, OSError) else err
    return DamagedFile(f"{uri}: damaged {what}: {why}")


def read_parquet(loc: Location, what: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file fpc-ray wrote at ``loc`` (only ``columns``, where given).

    Raises:
        DamagedFile: ``<uri>: damaged <what>: <why>`` for a file cut short, empty, not Parquet or
            damaged inside; the storage errors of :func:`guard` otherwise.
    """
    try:
        return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise damaged_parquet(loc.uri, what, e) from None


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file (for :func:`write_atomic`)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def write_parquet_atomic(loc: Location, table: pa.Table) -> None:
    """Write ``table`` at ``loc`` atomically (see :func:`write_atomic`): a reader never finds a
    half-written manifest or index, as it could when pyarrow writes in place."""
    write_atomic(loc, parquet_bytes(table))
