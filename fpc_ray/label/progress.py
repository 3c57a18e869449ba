"""Progress of a labelling run that a person can follow.

In a terminal, Ray Data's own progress bars show the pipeline. Elsewhere (a log file, a Ray job's
driver log, CI) they become multi-line status dumps every few seconds, so they are switched off
and this watcher prints one line at a time instead: frames written so far and the rate, read
from the Parquet footers of the parts already staged.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def interactive() -> bool:
    return sys.stdout.isatty()


def configure_ray_data() -> None:
    """Bars in a terminal; otherwise no bars and no INFO chatter from Ray Data."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive()
    if not interactive():
        # Ray Data says once at WARNING that its bars are off: that is by design here.
        logging.getLogger("ray.data").setLevel(logging.ERROR)


class StagedRowsWatcher:
    """Prints ``progress: N frames written (R/s)`` every ``every_s`` seconds while the run writes."""

    def __init__(self, list_parts: Callable[[], list[str]], fs: pafs.FileSystem, objects: int,
                 echo: Callable[[str], None], every_s: float = 15.0):
        self.list_parts, self.fs, self.objects, self.echo, self.every_s = list_parts, fs, objects, echo, every_s
        self._rows: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="label-progress", daemon=True)

    def __enter__(self) -> StagedRowsWatcher:
        if not interactive():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _count(self) -> int:
        try:
            parts = self.list_parts()
        except OSError:
            return sum(self._rows.values())
        for path in parts:
            if path not in self._rows:
                try:
                    self._rows[path] = pq.read_metadata(path, filesystem=self.fs).num_rows
                except (OSError, ValueError):  # still being written
                    pass
        return sum(self._rows.values())

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.every_s):
            rows = self._count()
            rate = rows / (time.monotonic() - started)
            self.echo(f"progress: {rows:,} frames written from {self.objects:,} objects ({rate:.1f} frames/s)")
