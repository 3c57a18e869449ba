"""The one place that turns a path or ``s3://`` URI into a pyarrow filesystem.

pyarrow's ``S3FileSystem()`` ignores ``AWS_ENDPOINT_URL*`` when built bare, so the endpoint is
resolved here explicitly: config first, then the standard AWS variables. Credentials are left
to the AWS default chain (environment, profile, instance role) and are never logged.

Storage errors are sorted here, once: what a user can fix (not found, access denied, no such
bucket, bad credentials, an endpoint host that does not resolve) is a :class:`UserError` (exit 2);
an outage (refused connections, timeouts, 5xx, throttling after retries) is a
:class:`StorageUnavailable` (exit 1). Conditional writes (the commit marker, the commit lock, the
promotion pointer) live in :mod:`fpc_ray.conditional`.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from fpc_ray.config import StorageConfig
from fpc_ray.errors import StorageUnavailable, UserError, exception_line


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, False for local paths."""
    return uri.startswith("s3://")


def s3_endpoint(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint URL: config, then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``."""
    if storage and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(storage: StorageConfig | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem with the endpoint and region resolved explicitly, with retries."""
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    endpoint = s3_endpoint(storage)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
        # Self-hosted S3 servers (MinIO, SeaweedFS) address buckets by path, not subdomain.
        kwargs["force_virtual_addressing"] = False
    kwargs["region"] = s3_region(storage)
    return pafs.S3FileSystem(**kwargs)


def s3_region(storage: StorageConfig | None = None) -> str:
    """The region: config, then ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then us-east-1."""
    return ((storage.region if storage else None) or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def s3_client(storage: StorageConfig | None = None):
    """A boto3 S3 client on the same endpoint and region as :func:`s3_filesystem`, for what
    pyarrow cannot do (conditional writes); credentials from the default chain."""
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint = s3_endpoint(storage)
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    # Self-hosted servers address buckets by path, as in s3_filesystem.
    extra = {"s3": {"addressing_style": "path"}} if endpoint else {}
    config = BotoConfig(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        **extra)
    return boto3.client("s3", endpoint_url=endpoint, region_name=s3_region(storage), config=config)


def bucket_key(loc: Location) -> tuple[str, str]:
    """(bucket, key) of an S3 location."""
    bucket, _, key = loc.path.partition("/")
    return bucket, key


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path inside it, with the original URI kept for messages."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        """A location below this one."""
        if is_remote(self.uri):
            return Location(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.uri, *parts))
        path = os.path.join(self.path, *parts)
        return Location(self.fs, path, path)

    def exists(self) -> bool:
        """True when a file or directory is at this location."""
        return self.info().type != pafs.FileType.NotFound

    def info(self) -> pafs.FileInfo:
        """The pyarrow file info, with filesystem errors turned into user errors."""
        return guard(self.uri, lambda: self.fs.get_file_info(self.path))

    def entries(self, recursive: bool = False) -> list[pafs.FileInfo]:
        """What this directory holds (everything below it with ``recursive``); none when it does
        not exist. Filesystem errors as for every other call here."""
        return guard(self.uri, lambda: self.fs.get_file_info(
            pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)))

    def read_bytes(self) -> bytes:
        """The whole object."""
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return guard(self.uri, read)

    def write_bytes(self, data: bytes) -> None:
        """Write (replace) the whole object, creating parent directories on local disk."""
        def write() -> None:
            if not is_remote(self.uri):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

        guard(self.uri, write)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Delete the file at this location."""
        guard(self.uri, lambda: self.fs.delete_file(self.path))

    def check_writable(self) -> None:
        """Write and delete a probe under this directory: fails early on a wrong bucket,
        endpoint or credentials, before any work is done. The probe's name is unique, so two
        runs starting at once on one output never delete each other's."""
        import secrets

        self.makedirs()
        probe = self.join(f".fpc-ray-write-probe-{os.getpid()}-{secrets.token_hex(4)}")
        probe.write_bytes(b"ok")
        probe.delete()

    def makedirs(self) -> None:
        """Create the directory (a no-op on S3, where prefixes need no creation)."""
        guard(self.uri, lambda: self.fs.create_dir(self.path, recursive=True))


# Markers in the text of pyarrow's (AWS SDK, curl) and botocore's errors. An outage is named by
# what failed to answer; everything else an S3 server says back is about the request itself.
_OUTAGE = ("NETWORK_CONNECTION", "curlCode: 7", "curlCode: 28", "curlCode: 52", "curlCode: 56",
           "Couldn't connect", "Connection refused", "timed out", "Timeout", "SLOW_DOWN", "SlowDown",
           "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError",
           "HTTP status 5", "response code 5", "Connection reset", "Could not connect to the endpoint",
           "Connection was closed", "EndpointConnectionError", "RequestTimeout")
_USER = ("ACCESS_DENIED", "AccessDenied", "NO_SUCH_BUCKET", "NoSuchBucket", "INVALID_ACCESS_KEY_ID",
         "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "Couldn't resolve host",
         "curlCode: 6,", "NO_SUCH_KEY", "NoSuchKey", "HTTP status 403", "HTTP status 404")


def is_outage(err: BaseException) -> bool:
    """True when a storage error is an outage (retry later), False when the request was wrong."""
    status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is not None:  # botocore said what the server answered: 5xx and throttling are outages
        return status >= 500 or status == 429
    text = f"{type(err).__name__}: {err}"
    if any(m in text for m in _USER):
        return False
    import errno

    if getattr(err, "errno", None) in (errno.EIO, errno.ENOSPC, errno.ETIMEDOUT, errno.ECONNREFUSED,
                                       errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return True
    return any(m in text for m in _OUTAGE)


def storage_error(uri: str, err: BaseException) -> Exception:
    """The one-line error for a failed storage call on ``uri``: user error or outage."""
    if isinstance(err, (UserError, StorageUnavailable)):
        return err
    if isinstance(err, FileNotFoundError):
        return UserError(f"not found: {uri}")
    if isinstance(err, PermissionError):
        return UserError(f"permission denied: {uri} ({exception_line(err)})")
    if is_outage(err):
        return StorageUnavailable(f"storage unavailable for {uri}: {exception_line(err)}")
    return UserError(f"cannot access {uri}: {exception_line(err)}")


def guard(uri: str, fn):
    """Run a storage call on ``uri``, turning its errors into one line (see :func:`storage_error`)."""
    try:
        return fn()
    except OSError as e:
        raise storage_error(uri, e) from None
    except Exception as e:
        if type(e).__module__.startswith(("botocore", "boto3")):
            raise storage_error(uri, e) from None
        raise


def resolve(uri: str | os.PathLike, storage: StorageConfig | None = None,
            filesystem: pafs.FileSystem | None = None) -> Location:
    """Turn a local path or ``s3://bucket/key`` into a :class:`Location`.

    ``filesystem`` reuses an already built filesystem of the right kind (hot loops).

    Raises:
        UserError: for unsupported schemes.
    """
    uri = os.fspath(uri)
    if is_remote(uri):
        # Not urlparse: a key is any string, and '#', '?', '%' are part of it, not a fragment,
        # a query or an escape.
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise UserError(f"{uri}: an s3:// URI needs a bucket")
        path = (bucket + "/" + key.lstrip("/")).rstrip("/")
        return Location(filesystem or s3_filesystem(storage), path, uri.rstrip("/"))
    if "://" in uri:
        raise UserError(f"{uri}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(filesystem or pafs.LocalFileSystem(), path, path)
