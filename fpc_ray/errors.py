"""The exception types a command turns into one line and an exit code.

The CLI turns a :class:`UserError` into a single ``error: ...`` line and exit code 2, a
:class:`RunFailed` (and its subclass :class:`StorageUnavailable`) into one line and exit code 1;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: bad config, missing file, unreadable data, bad credentials."""


class RunFailed(Exception):
    """A run that could not finish for reasons outside the user's input (storage outage,
    lost workers, a concurrent run); it committed nothing and may simply be run again. The CLI
    exits 1."""


class StorageUnavailable(RunFailed):
    """Storage that did not answer, or answered with a server error, after retries: an outage,
    not a mistake, so a scheduler should retry (exit 1, not 2)."""


class ConcurrentChange(RunFailed):
    """Something a command read changed under it (another run committed the same run id, a
    concurrent retrain or a manual rollback moved the pointer); the command changed nothing of
    it and may be run again (exit 1)."""
