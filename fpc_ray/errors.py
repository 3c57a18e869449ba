"""The one exception type for mistakes a user can make (config, paths, data, credentials).

The CLI turns a :class:`UserError` into a single ``error: ...`` line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: bad config, missing file, unreadable data, bad credentials."""


class RunFailed(Exception):
    """A run that could not finish for reasons outside the user's input (storage outage,
    lost workers); it committed nothing and may simply be run again. The CLI exits 1."""
