"""The commit protocol of labelling runs, without Ray: small Parquet parts staged by hand, on
local disk and on a real S3 server (SeaweedFS), committed by concurrent attempts."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fpc_ray.errors import RunFailed, failure_line
from fpc_ray.label import runs
from fpc_ray.label.lock import CommitLock
from fpc_ray.label.schema import LABEL_SCHEMA
from fpc_ray.storage import resolve


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An empty labelling output, on local disk or under a fresh S3 prefix."""
    if request.param == "local":
        return resolve(str(tmp_path / "out"))
    request.getfixturevalue("s3_server")
    return resolve(f"s3://test/runs-{uuid.uuid4().hex[:8]}")


def _objects(*names: str) -> list[dict]:
    return [{"uri": f"s3://archive/{n}", "size": len(n), "mtime_ns": 1} for n in names]


def _stage(attempt: runs.Attempt, objects: list[dict], per_part: int = 2) -> None:
    """Stage LABEL_SCHEMA rows (two frames per object) as the Ray pipeline would."""
    attempt.staged.makedirs()
    rows = [{"source_uri": o["uri"], "frame": f, "label": "Fetal brain", "run_id": attempt.run_id,
             "error": None} for o in objects for f in range(2)]
    for i in range(0, len(rows), per_part * 2):
        table = pa.Table.from_pylist(rows[i:i + per_part * 2], schema=LABEL_SCHEMA)
        pq.write_table(table, attempt.staged.join(f"{uuid.uuid4().hex}_{i}.parquet").path,
                       filesystem=attempt.staged.fs)


def _summary(objects: list[dict]) -> dict:
    return {"objects": {"listed": len(objects), "skipped": 0, "labelled": len(objects)}, "timings": {}}


def _attempt(output, run_id: str) -> runs.Attempt:
    _, baseline = runs.committed_objects(output)
    return runs.Attempt(output, run_id, baseline=baseline)


def _committed_uris(output) -> list[str]:
    """source_uri of every committed row (frame 0), over every committed run."""
    uris = []
    for run in runs.committed_runs(output):
        for part in runs.run_parts(run):
            table = pq.read_table(part, filesystem=run.fs)
            uris += [u for u, f in zip(table["source_uri"].to_pylist(), table["frame"].to_pylist(),
                                       strict=True) if f == 0]
    return sorted(uris)


def test_attempt_ids_are_dated_and_unique():
    now = dt.datetime(2026, 11, 25, 3, 4, 5, tzinfo=dt.UTC)
    a, b = runs.new_attempt_id(now), runs.new_attempt_id(now)
    assert a != b and a.startswith("20261125T030405Z-") and len(a.split("-")[1]) == 6
    assert runs.attempt_started(a) == now and runs.attempt_started("junk") is None


def test_commit_writes_the_layout_the_marker_and_the_index(output):
    objs = _objects("a.png", "b.png", "c.dcm")
    attempt = _attempt(output, "r1")
    _stage(attempt, objs)
    summary = runs.commit(attempt, objs, _summary(objs), echo=lambda s: None)
    assert summary["attempt"] == attempt.attempt_id and summary["rows"] == 6 and summary["objects"]["labelled"] == 3
    marker = json.loads(attempt.run_dir.join(runs.SUCCESS).read_text())
    assert marker["attempt"] == attempt.attempt_id
    assert [p.rsplit("/", 1)[-1] for p in runs.run_parts(attempt.run_dir)] == [
        f"part-{attempt.attempt_id}-00000.parquet", f"part-{attempt.attempt_id}-00001.parquet"]
    assert not attempt.staged.exists()
    index, covered = runs.read_index(output)
    assert covered == {"r1"} and sorted(index["uri"].to_pylist()) == [o["uri"] for o in objs]
    assert runs.already_labelled(output) == {(o["uri"], o["size"], o["mtime_ns"]) for o in objs}


def test_same_run_id_committed_meanwhile_is_refused_and_keeps_the_winner(output):
    objs = _objects("a.png", "b.png")
    first, second = _attempt(output, "nightly"), _attempt(output, "nightly")
    _stage(first, objs)
    _stage(second, objs)
    runs.commit(first, objs, _summary(objs), echo=lambda s: None)
    with pytest.raises(RunFailed, match=f"run nightly was committed .* by attempt {first.attempt_id}"):
        runs.commit(second, objs, _summary(objs), echo=lambda s: None)
    assert not second.staged.exists()
    assert _committed_uris(output) == [o["uri"] for o in objs]


def test_a_late_committer_drops_rows_committed_meanwhile(output):
    early, late = _attempt(output, "early"), _attempt(output, "late")  # both start on an empty output
    _stage(early, _objects("a.png", "b.png"))
    _stage(late, _objects("b.png", "c.png", "d.png"), per_part=1)
    runs.commit(early, _objects("a.png", "b.png"), _summary(_objects("a.png", "b.png")), echo=lambda s: None)
    said = []
    summary = runs.commit(late, _objects("b.png", "c.png", "d.png"), _summary(_objects("b.png", "c.png", "d.png")),
                          echo=said.append)
    assert summary["objects"]["labelled"] == 2 and summary["objects"]["dropped_late"] == 1
    assert summary["rows"] == 4 and any("dropped the rows of 1 object" in s for s in said)
    assert _committed_uris(output) == [o["uri"] for o in _objects("a.png", "b.png", "c.png", "d.png")]
    late_objects = pq.read_table(late.run_dir.join(runs.OBJECTS).path, filesystem=output.fs)
    assert sorted(late_objects["uri"].to_pylist()) == [o["uri"] for o in _objects("c.png", "d.png")]


def test_concurrent_commits_each_object_once(output):
    """Four attempts (two run ids twice) claim overlapping objects and commit at once."""
    claims = {("x", 0): ("a", "b", "c"), ("x", 1): ("a", "b", "c"),
              ("y", 0): ("b", "c", "d"), ("y", 1): ("b", "c", "d")}
    attempts = {}
    for (rid, k), names in claims.items():
        attempts[(rid, k)] = _attempt(output, rid)
        _stage(attempts[(rid, k)], _objects(*names), per_part=1)
    outcomes = {}

    def go(key):
        objs = _objects(*claims[key])
        try:
            outcomes[key] = runs.commit(attempts[key], objs, _summary(objs), echo=lambda s: None)
        except RunFailed as e:
            outcomes[key] = e

    threads = [threading.Thread(target=go, args=(key,)) for key in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid in ("x", "y"):  # one attempt per run id committed, the other refused
        assert sum(isinstance(outcomes[(rid, k)], dict) for k in (0, 1)) == 1, outcomes
    assert _committed_uris(output) == [o["uri"] for o in _objects("a", "b", "c", "d")]
    index, covered = runs.read_index(output)
    assert covered == {"x", "y"} and sorted(index["uri"].to_pylist()) == _committed_uris(output)


def test_a_cut_short_commit_does_not_count_and_is_cleared(output):
    objs = _objects("a.png")
    dead = _attempt(output, "r")
    _stage(dead, objs)
    dead.run_dir.makedirs()  # died after moving a part, before the marker
    output.fs.copy_file(runs.parquet_parts(dead.staged)[0], dead.run_dir.join("part-00009.parquet").path)
    assert runs.committed_runs(output) == [] and runs.already_labelled(output) == set()
    rerun = _attempt(output, "r")
    _stage(rerun, objs)
    runs.commit(rerun, objs, _summary(objs), echo=lambda s: None)
    assert [p.rsplit("/", 1)[-1] for p in runs.run_parts(rerun.run_dir)] == [f"part-{rerun.attempt_id}-00000.parquet"]
    assert dead.staged.exists()  # another attempt's staging is never deleted by a commit


def test_runs_the_index_does_not_cover_are_read_and_deleted_runs_drop_out(output):
    for rid, names in (("old1", ("a",)), ("old2", ("b",))):
        attempt = _attempt(output, rid)
        _stage(attempt, _objects(*names))
        runs.commit(attempt, _objects(*names), _summary(_objects(*names)), echo=lambda s: None)
    output.join(runs.INDEX).delete()  # an output written before the index existed
    assert {k[0] for k in runs.already_labelled(output)} == {o["uri"] for o in _objects("a", "b")}
    attempt = _attempt(output, "new")
    _stage(attempt, _objects("c"))
    runs.commit(attempt, _objects("c"), _summary(_objects("c")), echo=lambda s: None)
    assert runs.read_index(output)[1] == {"old1", "old2", "new"}
    output.fs.delete_dir(output.join("run=old1").path)  # a user removes a run to relabel it
    assert {k[0] for k in runs.already_labelled(output)} == {o["uri"] for o in _objects("b", "c")}


def test_vanished_objects_and_lost_rows_are_left_for_a_later_run(output):
    objs = _objects("a.png", "gone.png", "lost.png")
    attempt = _attempt(output, "r")
    _stage(attempt, objs[:1])
    vanished = pa.Table.from_pylist([{"source_uri": objs[1]["uri"], "frame": 0, "run_id": "r",
                                      "error": "vanished: listed but no longer readable"}], schema=LABEL_SCHEMA)
    pq.write_table(vanished, attempt.staged.join("v.parquet").path, filesystem=attempt.staged.fs)
    # lost.png has no staged rows at all (its staging was cleaned under a very long run)
    summary = runs.commit(attempt, objs, _summary(objs), echo=lambda s: None)
    assert summary["objects"]["labelled"] == 1 and summary["objects"]["left_for_later"] == 2
    assert {k[0] for k in runs.already_labelled(output)} == {objs[0]["uri"]}  # the others are listed again


def test_a_rerun_of_a_deleted_run_id_that_dies_mid_commit_claims_nothing(output, monkeypatch):
    objs = _objects("a.png")
    first = _attempt(output, "r")
    _stage(first, objs)
    runs.commit(first, objs, _summary(objs), echo=lambda s: None)
    output.fs.delete_dir(output.join("run=r").path)  # a user deletes run r to relabel it
    assert runs.already_labelled(output) == set()
    rerun = _attempt(output, "r")
    _stage(rerun, objs)

    def die(*args):  # the process dies after moving its parts, before the marker
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_create_marker", die)
    with pytest.raises(KeyboardInterrupt):
        runs.commit(rerun, objs, _summary(objs), echo=lambda s: None)
    assert runs.run_parts(rerun.run_dir)  # run=r holds parts again, and no marker
    # The stale index entry for r was dropped before the folder refilled: nothing counts as labelled.
    assert runs.already_labelled(output) == set()


def test_stale_staging_of_crashed_runs_is_cleaned_after_the_grace_period(output):
    remote = output.uri.startswith("s3://")
    # S3 modification times cannot be set: there the clock moves on instead.
    now = time.time() + (1.5 * 86400 if remote else 0)

    def aged(seconds: float) -> str:
        return runs.new_attempt_id(dt.datetime.fromtimestamp(now - seconds, dt.UTC))

    old, fresh = runs.Attempt(output, "crashed", aged(2 * 86400)), runs.Attempt(output, "running", aged(3600))
    long_run = runs.Attempt(output, "backfill", aged(3 * 86400))  # started long ago, still writing
    for a in (old, fresh, long_run):
        _stage(a, _objects("a"))
    if not remote:  # the crashed attempt last wrote two days ago; the long run wrote just now
        for part in runs.parquet_parts(old.staged):
            os.utime(part, (now - 2 * 86400, now - 2 * 86400))
    legacy = output.join(runs.STAGING, "run=legacy")
    legacy.makedirs()
    legacy.join("part.parquet").write_bytes(b"x")
    if not remote:
        os.utime(legacy.join("part.parquet").path, (now - 3 * 86400, now - 3 * 86400))
    said = []
    deleted = runs.clean_stale_staging(output, echo=said.append, now=now)
    expected = [f"run=crashed/attempt={old.attempt_id}", "run=legacy/part.parquet"]
    if remote:
        expected.insert(0, f"run=backfill/attempt={long_run.attempt_id}")
    assert sorted(deleted) == expected
    assert len(said) == 1 and f"{len(expected)} stale staging folder(s) older than 24 h" in said[0]
    assert fresh.staged.exists() and not old.staged.exists()
    assert long_run.staged.exists() is (not remote)  # on S3 the moved clock makes its files old too


def test_local_commit_lock_excludes_and_times_out_with_one_line(tmp_path):
    out = resolve(str(tmp_path))
    with CommitLock(out, "holder"):
        with pytest.raises(RunFailed, match="another commit .* held the lock for more than 0s"):
            with CommitLock(out, "waiter", wait_s=0.2, poll_s=0.05):
                pass
    with CommitLock(out, "next", wait_s=0.2):  # released on exit
        pass


def test_s3_lease_expires_and_exactly_one_taker_wins(s3_server):
    from fpc_ray.conditional import PreconditionFailed, get_with_etag, put_if_match

    out = resolve(f"s3://test/lease-{uuid.uuid4().hex[:8]}")
    dead = CommitLock(out, "dead", lease_s=0.5).__enter__()  # a holder that dies: never released
    with pytest.raises(RunFailed, match="attempt dead"):
        with CommitLock(out, "impatient", wait_s=0.1, poll_s=0.05):
            pass
    time.sleep(0.6)
    _, stale = get_with_etag(out.join("_commit.lock"))
    put_if_match(out.join("_commit.lock"), b'{"attempt": "winner", "expires_at": "2000-01-01T00:00:00+00:00"}', stale)
    with pytest.raises(PreconditionFailed):  # the second taker of the same stale lease loses
        put_if_match(out.join("_commit.lock"), b"{}", stale)
    with CommitLock(out, "next", wait_s=2, poll_s=0.05, lease_s=0.5) as lock:  # takes the expired lease over
        dead.__exit__(None, None, None)  # the dead holder's late release must not free it
        body, _ = get_with_etag(out.join("_commit.lock"))
        assert json.loads(body)["attempt"] == "next"
        lock.renew(force=True)
    assert get_with_etag(out.join("_commit.lock")) is None


def test_s3_lease_expiry_is_timed_by_the_contender_not_the_holders_clock(s3_server):
    from fpc_ray.conditional import put_if_absent

    out = resolve(f"s3://test/skew-{uuid.uuid4().hex[:8]}")
    # A live holder whose clock is far behind: by its own word the lease expired long ago.
    put_if_absent(out.join("_commit.lock"), b'{"attempt": "skewed", "expires_at": "2000-01-01T00:00:00+00:00"}')
    with pytest.raises(RunFailed, match="attempt skewed"):
        with CommitLock(out, "contender", wait_s=0.5, poll_s=0.05, lease_s=5):
            pass


def test_s3_conditional_create_refuses_an_existing_key(s3_server):
    from fpc_ray.conditional import PreconditionFailed, delete_if_match, put_if_absent

    loc = resolve(f"s3://test/cond-{uuid.uuid4().hex[:8]}/marker")
    etag = put_if_absent(loc, b"one")
    with pytest.raises(PreconditionFailed):
        put_if_absent(loc, b"two")
    assert loc.read_bytes() == b"one"
    assert not delete_if_match(loc, '"0000"') and loc.exists()
    assert delete_if_match(loc, etag) and not loc.exists()


def test_failure_line_names_the_actors_error_not_rays_retry_hint():
    from ray.exceptions import RayTaskError

    try:
        try:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")
        except OSError as inner:
            raise OSError("s3://archive/x.dcm: read failed: AWS Error NETWORK_CONNECTION") from inner
    except OSError as raised:
        wrapped = RayTaskError("MapBatches(PredictorActor)", "Traceback ...\nRetry with max_retries=3", raised)
    try:
        raise RuntimeError("Task failed; retry hint") from wrapped
    except RuntimeError as outer:  # a Ray Data wrapper in its own module would be skipped likewise
        line = failure_line(outer)
    assert line == "RuntimeError: Task failed; retry hint"
    assert failure_line(wrapped) == "OSError: s3://archive/x.dcm: read failed: AWS Error NETWORK_CONNECTION"
    assert failure_line(wrapped.as_instanceof_cause()).startswith("OSError: s3://archive/x.dcm: read failed")


def test_history_benchmark_reports_both_start_ups(tmp_path):
    from fpc_ray.bench.history import run_benchmark

    lines = run_benchmark(3, str(tmp_path))
    assert any("1 committed run:" in ln for ln in lines) and any("3 committed runs:" in ln for ln in lines)
    assert any("no index" in ln for ln in lines)


def test_commit_records_the_runs_stats(output):
    """The marker's ``stats`` are computed from the committed parts, on local disk and on S3."""
    objects = _objects("a.png", "b.png", "c.png")
    attempt = _attempt(output, "r1")
    _stage(attempt, objects, per_part=1)
    summary = runs.commit(attempt, objects, _summary(objects), echo=lambda s: None)
    stats = summary["stats"]
    assert (stats["rows"], stats["labelled"], stats["by_class"]) == (6, 6, {"Fetal brain": 6})
    assert stats["input_kind"] == {"unknown": 6}  # rows that do not say what they were read from
    assert json.loads(attempt.run_dir.join(runs.SUCCESS).read_text())["stats"] == stats


def test_an_old_schema_run_beside_a_new_one_is_read(output):
    """A run committed before ``input_kind`` existed: the index, the objects and the stats of
    every run read it, and a new commit beside it works."""
    old_schema = pa.schema([f for f in LABEL_SCHEMA if f.name != "input_kind"])
    old = output.join("run=r0")
    old.makedirs()
    table = pa.Table.from_pylist([{"source_uri": "s3://archive/old.png", "frame": 0, "label": "Other"}],
                                 schema=old_schema)
    pq.write_table(table, old.join("part-00000.parquet").path, filesystem=old.fs)
    pq.write_table(pa.Table.from_pylist([{"uri": "s3://archive/old.png", "size": 7, "mtime_ns": 1}],
                                        schema=runs.OBJECTS_SCHEMA), old.join(runs.OBJECTS).path, filesystem=old.fs)
    old.join(runs.SUCCESS).write_bytes(json.dumps({"run_id": "r0", "rows": 1}).encode())
    objects = _objects("a.png")
    attempt = _attempt(output, "r1")
    _stage(attempt, objects)
    runs.commit(attempt, objects, _summary(objects), echo=lambda s: None)
    index, committed = runs.committed_objects(output)
    assert committed == {"r0", "r1"} and sorted(index["run"].to_pylist()) == ["r0", "r1"]
    from fpc_ray.label.run_stats import read_stats_table, run_stats

    both = read_stats_table(runs.run_parts(old) + runs.run_parts(attempt.run_dir), output.fs)
    assert both["input_kind"].null_count == 3 and run_stats(both, 0.5)["by_class"] == {"Fetal brain": 2, "Other": 1}
