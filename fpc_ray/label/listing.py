"""What a labelling run reads: every object under its input prefixes, local or remote.

A hostile local tree (symlink loops, links out of the prefix, names that are not UTF-8) lists
each object inside the prefix once and nothing outside it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pyarrow.fs as pafs

from fpc_ray.errors import UserError, private_reason
from fpc_ray.label.schema import error_text
from fpc_ray.storage import Location, guard, is_remote, storage_error

BAD_NAME = error_text("bad_name", "file name is not valid UTF-8")


def _walk_local(root: str) -> Iterator[tuple[str, os.stat_result | None, str | None]]:
    """(uri, stat, listing error) of every file under a local folder.

    Symlinks (to files or folders) are followed only where they resolve inside the prefix, and
    no folder is entered twice (symlink loops), so a hostile tree neither leaks outside the
    prefix nor repeats objects. Names are read as bytes: one that is not UTF-8 gets a printable
    URI (its bytes backslash-escaped) and a listing error instead of failing the listing; so does
    a subfolder that cannot be listed (``unreadable``: one row for the folder, its stat as listed).
    """
    real_root = os.path.realpath(os.fsencode(root))
    seen: set[tuple[int, int]] = set()
    stack_root = os.fsencode(root)
    stack = [(stack_root, root, False)]  # (path as bytes, printable path, bad name)
    linked = []  # folders reached through a symlink: walked after the real tree, so a link to a
    while stack or linked:  # folder inside it is the duplicate that is skipped, not the folder
        path, shown, bad = stack.pop() if stack else linked.pop()
        st = None  # an error row of a folder os.stat refused says size and time 0, not another's
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = list(it)
        except FileNotFoundError:  # removed while we listed: nothing there to label
            continue
        except OSError as e:
            if path == stack_root:  # the input prefix itself: the user's error, said in one line
                raise
            # One unreadable subfolder (permissions, an I/O error) is one error row; the rest is labelled.
            yield shown, st, error_text("unreadable", f"folder cannot be listed ({private_reason(e)})")
            continue
        for entry in entries:
            try:
                name, entry_bad = entry.name.decode("utf-8"), bad
            except UnicodeDecodeError:
                name, entry_bad = entry.name.decode("utf-8", "backslashreplace"), True
            child = os.path.join(shown, name)
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([real_root, target]) != real_root:
                    continue
            try:
                est = entry.stat()  # follows an inside symlink
            except OSError:  # dangling link, or vanished since the scan
                continue
            if stat.S_ISDIR(est.st_mode):
                (linked if entry.is_symlink() else stack).append((entry.path, child, entry_bad))
            elif stat.S_ISREG(est.st_mode):
                yield child, est, BAD_NAME if entry_bad else None


def list_objects(prefix: Location) -> list[dict]:
    """Every object under the prefix (or the one object it names), sorted by URI.

    Each is ``{uri, size, mtime_ns, listing_error}``; ``listing_error`` is set where the object
    cannot be read by its URI at all (a local name that is not UTF-8).
    """
    info = prefix.info()
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{prefix.uri}: no such input prefix")
    if info.type == pafs.FileType.File:
        return [{"uri": prefix.uri, "size": int(info.size or 0), "mtime_ns": int(info.mtime_ns or 0),
                 "listing_error": None}]
    if not is_remote(prefix.uri):
        try:
            out = [{"uri": uri, "size": st.st_size if st else 0, "mtime_ns": st.st_mtime_ns if st else 0,
                    "listing_error": err} for uri, st, err in _walk_local(prefix.path)]
        except OSError as e:
            raise storage_error(prefix.uri, e) from None
        return sorted(out, key=lambda o: o["uri"])
    entries = guard(prefix.uri, lambda: prefix.fs.get_file_info(pafs.FileSelector(prefix.path, recursive=True)))
    out = []
    for e in entries:
        if e.type != pafs.FileType.File:
            continue
        rel = e.path[len(prefix.path):].lstrip("/")
        uri = prefix.join(rel).uri if rel else prefix.uri
        out.append({"uri": uri, "size": int(e.size or 0), "mtime_ns": int(e.mtime_ns or 0), "listing_error": None})
    return sorted(out, key=lambda o: o["uri"])


def list_inputs(sources: list[Location]) -> list[dict]:
    """The objects under every input prefix, each once (prefixes may overlap), sorted by URI."""
    by_uri = {}
    for source in sources:
        for o in list_objects(source):
            by_uri.setdefault(o["uri"], o)
    return [by_uri[u] for u in sorted(by_uri)]
