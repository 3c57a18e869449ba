"""Conditional writes on S3: create-if-absent and replace/delete-if-unchanged, by ETag.

pyarrow's filesystem cannot send ``If-None-Match`` / ``If-Match``, so these go through boto3
(:func:`fpc_ray.storage.s3_client`). AWS S3 and SeaweedFS honour both on PutObject (and
``If-Match`` on DeleteObject) and answer 412 when the condition fails, which is
:class:`PreconditionFailed` here.

Fallback: a server that answers 501 / NotImplemented to a conditional request gets the
unconditional equivalent, checked as well as one can without server help: compare the current
ETag (HEAD) first, PUT plainly, then read the object back and claim success only if it holds our
bytes. Two writers racing inside that window can both believe they won; the commit lock's lease
makes that window short, and the marker and the index are only written under the lock, so the
fallback is a best effort documented as such, not a guarantee.
"""

from __future__ import annotations

import logging
import os

from fpc_ray.config import StorageConfig
from fpc_ray.storage import Location, bucket_key, guard, s3_client, s3_endpoint, s3_region

log = logging.getLogger(__name__)
_clients: dict = {}


class PreconditionFailed(Exception):
    """The object was not as the condition required (it existed, or its ETag had changed)."""


def _client(storage: StorageConfig | None):
    # Keyed by what the client was built from: tests (and demos) point the variables elsewhere.
    key = (s3_endpoint(storage), s3_region(storage), os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _clients:
        _clients[key] = s3_client(storage)
    return _clients[key]


def _code(err: Exception) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    return (str(response.get("Error", {}).get("Code", "")),
            int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def _unsupported(err: Exception) -> bool:
    code, status = _code(err)
    return status == 501 or code in ("NotImplemented", "NotImplementedError")


def _failed_condition(err: Exception) -> bool:
    code, status = _code(err)
    # 409 ConditionalRequestConflict: AWS's answer to two conditional writes racing on one key.
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _missing(err: Exception) -> bool:
    code, status = _code(err)
    return status == 404 or code in ("NoSuchKey", "404", "NotFound")


def get_with_etag(loc: Location, storage: StorageConfig | None = None) -> tuple[bytes, str] | None:
    """The object's bytes and ETag in one request, or None where there is no object."""
    from botocore.exceptions import ClientError

    bucket, key = bucket_key(loc)

    def get():
        try:
            response = _client(storage).get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _missing(e):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    return guard(loc.uri, get)


def _etag(loc: Location, storage: StorageConfig | None) -> str | None:
    from botocore.exceptions import ClientError

    bucket, key = bucket_key(loc)
    try:
        return _client(storage).head_object(Bucket=bucket, Key=key)["ETag"]
    except ClientError as e:
        if _missing(e):
            return None
        raise


def _put_checked(loc: Location, data: bytes, expect_etag: str | None, storage: StorageConfig | None) -> str:
    """The fallback (see the module docstring): compare, plain PUT, read back."""
    log.warning("%s: the S3 server does not support conditional writes; using put-and-verify", loc.uri)
    if _etag(loc, storage) != expect_etag:
        raise PreconditionFailed(loc.uri)
    bucket, key = bucket_key(loc)
    _client(storage).put_object(Bucket=bucket, Key=key, Body=data)
    back = get_with_etag(loc, storage)
    if back is None or back[0] != data:
        raise PreconditionFailed(loc.uri)
    return back[1]


def _put(loc: Location, data: bytes, storage: StorageConfig | None, expect_etag: str | None) -> str:
    from botocore.exceptions import ClientError

    bucket, key = bucket_key(loc)
    condition = {"IfMatch": expect_etag} if expect_etag else {"IfNoneMatch": "*"}

    def put() -> str:
        try:
            return _client(storage).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as e:
            if _failed_condition(e) or (expect_etag and _missing(e)):
                raise PreconditionFailed(loc.uri) from None
            if _unsupported(e):
                return _put_checked(loc, data, expect_etag, storage)
            raise

    return guard(loc.uri, put)


def put_if_absent(loc: Location, data: bytes, storage: StorageConfig | None = None) -> str:
    """Create the object only if no object has the key (``If-None-Match: *``); its ETag.

    Raises:
        PreconditionFailed: an object already has the key.
    """
    return _put(loc, data, storage, None)


def put_if_match(loc: Location, data: bytes, etag: str, storage: StorageConfig | None = None) -> str:
    """Replace the object only if its ETag is still ``etag`` (``If-Match``); the new ETag.

    Raises:
        PreconditionFailed: the object changed or vanished since ``etag`` was read.
    """
    return _put(loc, data, storage, etag)


def delete_if_match(loc: Location, etag: str, storage: StorageConfig | None = None) -> bool:
    """Delete the object only if its ETag is still ``etag``; False when it was not (or gone)."""
    from botocore.exceptions import ClientError

    bucket, key = bucket_key(loc)

    def delete() -> bool:
        try:
            _client(storage).delete_object(Bucket=bucket, Key=key, IfMatch=etag)
            return True
        except ClientError as e:
            if _failed_condition(e) or _missing(e):
                return False
            if not _unsupported(e):
                raise
        if _etag(loc, storage) != etag:  # fallback, as for PUT
            return False
        _client(storage).delete_object(Bucket=bucket, Key=key)
        return True

    return guard(loc.uri, delete)
