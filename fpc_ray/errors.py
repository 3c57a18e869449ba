"""The exception types a command turns into one line and an exit code.

The CLI turns a :class:`UserError` into a single ``error: ...`` line and exit code 2, a
:class:`RunFailed` (and its subclass :class:`StorageUnavailable`) into one line and exit code 1;
anything else is a bug and keeps its traceback.
"""

import os
import re

# The S3 client's reason code at the head of its messages (``AWS Error ACCESS_DENIED during ...``).
_AWS_REASON = re.compile(r"AWS Error \w+(?: \(HTTP status \d+\))?")
_ERRNO = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


# C0 and C1 control characters (newline, ESC of an ANSI sequence, ...) and the Unicode line and
# bidirectional-override characters: printed raw, they could forge a second ``error:`` line or
# recolour a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): safe to print on one line."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


def shorten(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, marked ``...``: a line quotes what it refuses (a value,
    a key, a frame id), enough to recognise it, never all of a hostile one."""
    return text if len(text) <= most else f"{text[:most]}..."


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


def run_job(run, args) -> int:
    """A job entrypoint's body (``jobs/*.py``): ``run(args)``'s exit code, or one ``error:`` line on
    stderr and 2 for a :class:`UserError`, 1 for a :class:`RunFailed`, as the CLI does."""
    import sys

    from fpc_ray.cluster import skip_update_checks

    skip_update_checks()
    try:
        return run(args)
    except UserError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 1


def root_cause(err: BaseException) -> BaseException:
    """The exception the failing code raised, unwrapped from Ray's wrappers.

    Ray Train's worker-group error gives its lowest rank's failure and its controller error the
    controller's; a task's or actor's error (``RayTaskError.cause``, ``__cause__``,
    ``__context__``) gives what it wraps. It stops at the first exception that is not Ray's own,
    so an actor's ``raise OSError(f"{uri}: ...") from e`` gives that error, whose message names
    the object, not ``e``; a chain of only Ray errors (a lost worker) gives the innermost.
    """
    seen = set()
    while _is_ray(err) and id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
        if failures:
            nxt = failures[min(failures)]
        elif getattr(err, "controller_failure", None) is not None:  # Ray Train's ControllerError
            nxt = err.controller_failure
        else:
            nxt = getattr(err, "cause", None)
            if not isinstance(nxt, BaseException):
                nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None:
            break
        err = nxt
    return err


def exception_line(err: BaseException, limit: int = 300) -> str:
    """``err`` as one line: its message's first non-blank line, or its type where it has none.

    Every one-line error in fpc-ray (storage, Ray failures, trials) is made here.
    """
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def private_reason(err: BaseException) -> str:
    """``err`` as a reason that quotes nothing of its message: for a storage error (an OSError)
    its reason code (``AWS Error ACCESS_DENIED``) or errno (``[Errno 13] Permission denied``) where
    it has one; else, and for every other exception, its type.

    Messages quote what they failed on: an object's key or path, a DICOM header value (a
    malformed PatientName). What an error row says of an object must carry no identifier, so it
    says why in these words only.
    """
    if not isinstance(err, OSError):  # a decoder's error: its message may quote a header value
        return type(err).__name__
    text = str(err)  # a storage error (pyarrow raises OSError): its reason code or errno only
    aws = _AWS_REASON.search(text)
    if aws:
        return aws.group(0)
    code = err.errno
    if not isinstance(code, int):
        found = _ERRNO.search(text)
        code = int(found.group(1)) if found else None
    return f"[Errno {code}] {os.strerror(code)}" if code is not None else type(err).__name__


def failure_line(err: BaseException) -> str:
    """One line naming what failed and why, from :func:`root_cause`.

    Ray's own error text ends in a hint about retries; the cause raised in the actor or worker
    (whose message names the object) is what a person needs.
    """
    root = root_cause(err)
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    if _is_ray(root) and lines:
        # A Ray error with no Python cause (a lost worker): its summary is its last line.
        return lines[-1][:300]
    return f"{type(root).__name__}: {exception_line(root)}"[:300] if lines else type(root).__name__


def ray_failure(err: BaseException, what: str) -> Exception:
    """The one-line error ``"<what>: <root cause>"`` for a failed Ray job (training, labelling).

    A :class:`UserError` behind it (an actor or worker that could not open a file) stays one,
    exit code 2; anything else becomes a :class:`RunFailed`, exit code 1.
    """
    cause = root_cause(err)
    if isinstance(cause, UserError):
        return UserError(f"{what}: {cause}")
    return RunFailed(f"{what}: {failure_line(err)}")


def _is_ray(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "ray"
