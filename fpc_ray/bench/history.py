"""Labelling start-up against history: what ``already_labelled`` costs with 1 and with N
committed runs under one output, with the index and without it (an output written before the
index existed, where every committed run's object list is read).

The runs are written straight into the committed layout (object lists, markers, one index), not
labelled: only the start-up's reading of history is measured, on local disk.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from fpc_ray.label.runs import INDEX, OBJECTS, OBJECTS_SCHEMA, SUCCESS, already_labelled, write_index
from fpc_ray.storage import resolve

OBJECTS_PER_RUN = 50
REPEATS = 3


def _history(root: str, runs: int) -> None:
    """``runs`` committed runs of OBJECTS_PER_RUN objects each, and the index covering them."""
    tables = []
    for i in range(runs):
        run_id = f"nightly-{i:05d}"
        folder = os.path.join(root, f"run={run_id}")
        os.makedirs(folder)
        objects = pa.table({"uri": [f"s3://archive/{i:05d}/{k:03d}.dcm" for k in range(OBJECTS_PER_RUN)],
                            "size": [1000 + k for k in range(OBJECTS_PER_RUN)],
                            "mtime_ns": [i * 10**9] * OBJECTS_PER_RUN}, schema=OBJECTS_SCHEMA)
        pq.write_table(objects, os.path.join(folder, OBJECTS))
        with open(os.path.join(folder, SUCCESS), "w") as f:
            json.dump({"run_id": run_id}, f)
        tables.append(objects.append_column("run", pa.array([run_id] * OBJECTS_PER_RUN)))
    write_index(resolve(root), pa.concat_tables(tables), {f"nightly-{i:05d}" for i in range(runs)})


def _startup_s(root: str) -> float:
    """Best of REPEATS: the time to learn what is already labelled."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        seen = already_labelled(resolve(root))
        best = min(best, time.perf_counter() - t0)
    if not seen:
        raise RuntimeError(f"{root}: the history is empty")
    return best


def run_benchmark(runs: int, workdir: str) -> list[str]:
    """Measure labelling start-up with 1 and with ``runs`` committed runs; lines to print."""
    one, many = os.path.join(workdir, "history-1"), os.path.join(workdir, f"history-{runs}")
    for root, n in ((one, 1), (many, runs)):
        if not os.path.exists(os.path.join(root, INDEX)):
            _history(root, n)
    t_one, t_many = _startup_s(one), _startup_s(many)
    os.rename(os.path.join(many, INDEX), os.path.join(many, INDEX + ".aside"))
    try:
        t_legacy = _startup_s(many)
    finally:
        os.rename(os.path.join(many, INDEX + ".aside"), os.path.join(many, INDEX))
    return [
        f"start-up (already_labelled, local disk, {OBJECTS_PER_RUN} objects per run, best of {REPEATS}):",
        f"  {'1 committed run:':<28}{t_one * 1e3:8.1f} ms",
        f"  {f'{runs} committed runs:':<28}{t_many * 1e3:8.1f} ms  ({t_many / t_one:.1f}x the one-run start-up; "
        f"the index holds {runs * OBJECTS_PER_RUN:,} objects)",
        f"  {f'{runs} runs, no index:':<28}{t_legacy * 1e3:8.1f} ms  (every run's object list read: "
        f"{t_legacy / t_many:.1f}x the indexed start-up)",
    ]
