"""The one place that turns a path or ``s3://`` URI into a pyarrow filesystem.

pyarrow's ``S3FileSystem()`` ignores ``AWS_ENDPOINT_URL*`` when built bare, so the endpoint is
resolved here explicitly: config first, then the standard AWS variables. Credentials are left
to the AWS default chain (environment, profile, instance role) and are never logged.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError


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
    region = (storage.region if storage else None) or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION"
    )
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


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
        return _guard(self.uri, lambda: self.fs.get_file_info(self.path))

    def read_bytes(self) -> bytes:
        """The whole object."""
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return _guard(self.uri, read)

    def write_bytes(self, data: bytes) -> None:
        """Write (replace) the whole object, creating parent directories on local disk."""
        def write() -> None:
            if not is_remote(self.uri):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

        _guard(self.uri, write)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Delete the file at this location."""
        _guard(self.uri, lambda: self.fs.delete_file(self.path))

    def check_writable(self) -> None:
        """Write and delete a probe under this directory: fails early on a wrong bucket,
        endpoint or credentials, before any work is done."""
        self.makedirs()
        probe = self.join(".fpc-ray-write-probe")
        probe.write_bytes(b"ok")
        probe.delete()

    def makedirs(self) -> None:
        """Create the directory (a no-op on S3, where prefixes need no creation)."""
        _guard(self.uri, lambda: self.fs.create_dir(self.path, recursive=True))


def _guard(uri: str, fn):
    """Run a filesystem call, turning missing files and access problems into one clear line."""
    try:
        return fn()
    except FileNotFoundError:
        raise UserError(f"not found: {uri}") from None
    except PermissionError as e:
        raise UserError(f"permission denied: {uri} ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"cannot access {uri}: {_first_line(e)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve(uri: str | os.PathLike, storage: StorageConfig | None = None,
            filesystem: pafs.FileSystem | None = None) -> Location:
    """Turn a local path or ``s3://bucket/key`` into a :class:`Location`.

    ``filesystem`` reuses an already built filesystem of the right kind (hot loops).

    Raises:
        UserError: for unsupported schemes.
    """
    uri = os.fspath(uri)
    if is_remote(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise UserError(f"{uri}: an s3:// URI needs a bucket")
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        return Location(filesystem or s3_filesystem(storage), path, uri.rstrip("/"))
    if "://" in uri:
        raise UserError(f"{uri}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(filesystem or pafs.LocalFileSystem(), path, path)
