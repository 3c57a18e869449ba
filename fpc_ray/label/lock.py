"""The commit lock: one commit at a time per labelling output.

Locally it is ``fcntl.flock`` on ``OUTPUT/_commit.lock``: the kernel releases it when the holder
exits or dies, so a killed run never blocks the next. On S3 it is a lease: the object
``OUTPUT/_commit.lock`` created with ``If-None-Match: *`` and holding ``{attempt, expires_at}``.
An expired lease (its holder died mid-commit) is taken over by a conditional PUT on the stale
ETag, which exactly one contender wins; the holder releases with a DELETE on its own ETag, so it
never deletes a lease someone else took over. A long commit renews its lease (:meth:`renew`),
which changes its ETag. A contender judges expiry by its own monotonic clock, never by the
holder's ``expires_at``: a lease counts as expired once the contender has seen the same ETag for
a whole lease period, so clocks that disagree between machines cannot break exclusivity.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

from fpc_ray.config import StorageConfig
from fpc_ray.errors import RunFailed
from fpc_ray.storage import Location, guard, is_remote

LOCK = "_commit.lock"
LEASE_S = 600.0
WAIT_S = 900.0


class CommitLock:
    """Context manager holding OUTPUT's commit lock for ``attempt``.

    Args:
        output: the labelling output.
        attempt: who holds it (the attempt id), written into the S3 lease for messages.
        wait_s: how long to wait for another commit before giving up with one line.
        lease_s: how long an S3 lease is valid without renewal.
    """

    def __init__(self, output: Location, attempt: str, storage: StorageConfig | None = None,
                 wait_s: float = WAIT_S, lease_s: float = LEASE_S, poll_s: float = 0.5):
        self.loc = output.join(LOCK)
        self.attempt, self.storage = attempt, storage
        self.wait_s, self.lease_s, self.poll_s = wait_s, lease_s, poll_s
        self._fd: int | None = None
        self._etag: str | None = None
        self._renewed = 0.0
        self._seen: tuple[str, float] | None = None  # (a holder's ETag, when we first saw it)

    def __enter__(self) -> CommitLock:
        deadline = time.monotonic() + self.wait_s
        holder = None
        while True:
            holder = self._try_local() if not is_remote(self.loc.uri) else self._try_s3()
            if holder is None:
                self._renewed = time.monotonic()
                return self
            if time.monotonic() >= deadline:
                raise RunFailed(f"{self.loc.uri}: another commit ({holder}) held the lock for more than "
                                f"{self.wait_s:.0f}s; nothing committed, run again later")
            time.sleep(self.poll_s)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._etag is not None:
            from fpc_ray.conditional import delete_if_match

            try:
                delete_if_match(self.loc, self._etag, self.storage)
            except Exception:  # noqa: BLE001 - an unreleased lease expires; the commit's outcome stands
                pass
            self._etag = None

    def _try_local(self) -> str | None:
        """None once locked; else a description of the holder."""
        import fcntl

        def open_lock() -> int:  # an output under a file, or not writable: one line, not a traceback
            os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
            return os.open(self.loc.path, os.O_RDWR | os.O_CREAT, 0o644)

        fd = guard(self.loc.uri, open_lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return "a process on this machine"
        self._fd = fd
        return None

    def _lease(self) -> bytes:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.lease_s)
        return json.dumps({"attempt": self.attempt, "expires_at": expires.isoformat()}).encode()

    def _try_s3(self) -> str | None:
        from fpc_ray.conditional import PreconditionFailed, get_with_etag, put_if_absent, put_if_match

        try:
            self._etag = put_if_absent(self.loc, self._lease(), self.storage)
            return None
        except PreconditionFailed:
            pass
        current = get_with_etag(self.loc, self.storage)
        if current is None:  # released in between: try again at once
            return "a commit that just finished"
        body, etag = current
        try:
            lease = json.loads(body)
            holder = f"attempt {lease['attempt']}, lease until {lease['expires_at']} by its clock"
        except (ValueError, KeyError, TypeError):
            holder = "an unreadable lease"
        if self._seen is None or self._seen[0] != etag:  # a new holder, or a renewal: time it afresh
            self._seen = (etag, time.monotonic())
        if time.monotonic() - self._seen[1] < self.lease_s:
            return holder
        try:  # the holder died mid-commit: take the lease over; one contender wins
            self._etag = put_if_match(self.loc, self._lease(), etag, self.storage)
            return None
        except PreconditionFailed:
            return holder

    def renew(self, force: bool = False) -> None:
        """Extend an S3 lease when a third of it has passed (call between slow steps); ``force``
        renews now, which also proves the lease is still ours (call before committing).

        Raises:
            RunFailed: the lease expired and another commit took it over.
        """
        if self._etag is None or (not force and time.monotonic() - self._renewed < self.lease_s / 3):
            return
        from fpc_ray.conditional import PreconditionFailed, put_if_match

        try:
            self._etag = guard(self.loc.uri, lambda: put_if_match(self.loc, self._lease(), self._etag,
                                                                   self.storage))
        except PreconditionFailed:
            self._etag = None
            raise RunFailed(f"{self.loc.uri}: this commit's lease expired and another commit took it "
                            f"over; attempt {self.attempt} stops without committing") from None
        self._renewed = time.monotonic()
