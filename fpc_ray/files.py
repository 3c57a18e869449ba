"""The tool's own files, read back bounded, strict and typed, and written atomically.

Everything fpc-ray writes and later reads again (run markers, model cards, pointers, metrics,
review manifests, indexes, run parts, configs, review exports) can be cut short by a crash, edited
by hand or damaged in transit. Read back here, a damaged file is one :class:`UserError` naming
the file and what is wrong with it (exit 2, nothing written), never a traceback:

- :func:`parse_json` decodes UTF-8 strictly and parses with limits on nesting and integer digits
  (Python's own limits give a ``RecursionError`` or a ``ValueError`` traceback);
- :func:`read_json` reads a bounded file and, with a pydantic ``model``, validates it;
- :func:`temporary_name` names a writer's temporary file uniquely (process, thread and a random
  part), so writers that share a pid (threads; containers that are each PID 1 on one volume)
  never write into one another's temporary; :func:`write_atomic` renames it into place.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fpc_ray.errors import UserError, printable
from fpc_ray.storage import Location, guard, is_remote

MAX_JSON_BYTES = 64 * 2**20  # the largest JSON file fpc-ray writes is a card or a search: kilobytes
MAX_DEPTH = 64                # the deepest document fpc-ray writes nests about 6 levels
MAX_INT_DIGITS = 64           # a byte count, a seed or a timestamp fits in 20

M = TypeVar("M", bound=BaseModel)


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
        raise UserError(f"{where}: damaged {what}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") \
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
        raise UserError(f"{where}: damaged {what}: {e}") from None
    except json.JSONDecodeError as e:
        why = "empty" if not text.strip() else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise UserError(f"{where}: damaged {what}: {why}") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{where}: damaged {what}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # Python's own integer-digit limit, in a float or elsewhere
        raise UserError(f"{where}: damaged {what}: {printable(str(e))[:200]}") from None
    if _depth(value) > MAX_DEPTH:
        raise UserError(f"{where}: damaged {what}: nested deeper than {MAX_DEPTH} levels")
    return value


def read_bounded(loc: Location, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole file at ``loc``, refused in one line when over ``limit`` bytes (read no further)."""
    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as f:
            data = f.read(limit + 1)
        return data

    data = guard(loc.uri, read)
    if len(data) > limit:
        raise UserError(f"{loc.uri}: damaged {what}: larger than {limit} bytes")
    return data


def validated(value: Any, model: type[M], where: str, what: str) -> M:
    """``value`` validated into ``model``; the first problem as one line."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserError(f"{where}: damaged {what}: {field}: {printable(first['msg'])}") from None


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
