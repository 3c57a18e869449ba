"""Storage: odd S3 keys name the object they say, and errors are sorted into user mistakes and
outages, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import socket

import pytest

from fpc_ray.errors import StorageUnavailable, UserError, private_reason
from fpc_ray.label.listing import list_objects
from fpc_ray.storage import is_outage, resolve

pytestmark = pytest.mark.s3

ODD_KEYS = ["odd/a#frag.png", "odd/b?x=1&y=2.png", "odd/with space.png", "odd/100%25 sure %.png",
            "odd/é-ü-日本.png", "odd/#?% é.dcm"]


def test_odd_keys_are_read_as_the_object_they_name(s3_server):
    client = s3_server.client()
    for i, key in enumerate(ODD_KEYS):
        client.put_object(Bucket="test", Key=key, Body=f"body {i}".encode())
    client.put_object(Bucket="test", Key="odd/a", Body=b"decoy: what a#frag would be cut to")
    for i, key in enumerate(ODD_KEYS):
        assert resolve(f"s3://test/{key}").read_bytes() == f"body {i}".encode(), key
    listed = {o["uri"] for o in list_objects(resolve("s3://test/odd/"))}
    assert listed == {f"s3://test/{k}" for k in [*ODD_KEYS, "odd/a"]}
    for uri in listed:  # what the listing gives, the reader reads
        assert resolve(uri).exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_an_outage_not_a_user_error(s3_server):
    import pyarrow.fs as pafs

    # One try, not the eight of s3_filesystem: the same refused connection, 40 s sooner.
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{_closed_port()}", scheme="http", region="us-east-1",
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with pytest.raises(StorageUnavailable, match=r"storage unavailable for s3://test/x\.png: "):
        resolve("s3://test/x.png", filesystem=fs).read_bytes()


def test_user_mistakes_are_user_errors(s3_server, monkeypatch):
    with pytest.raises(UserError, match="not found: s3://test/no-such-object"):
        resolve("s3://test/no-such-object").read_bytes()
    with pytest.raises(UserError, match="s3://no-such-bucket-fpc/x") as info:
        resolve("s3://no-such-bucket-fpc/x").read_bytes()
    assert not isinstance(info.value, StorageUnavailable)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(UserError) as info:
        resolve("s3://test/anything").write_bytes(b"x")
    assert not isinstance(info.value, StorageUnavailable)


@pytest.mark.parametrize("text,outage", [
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server", True),
    ("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.", True),
    ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation", True),
    ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", False),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 6, Couldn't resolve host name", False),
    ("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation", False),
])
def test_error_texts_are_classified(text, outage):
    assert is_outage(OSError(text)) is outage


@pytest.mark.parametrize("status,outage", [(500, True), (502, True), (503, True), (429, True), (403, False),
                                           (404, False), (412, False)])
def test_botocore_errors_are_classified_by_http_status(status, outage):
    from botocore.exceptions import ClientError

    # A proxy's 502 carries an HTML body and no S3 error code: the status alone decides.
    err = ClientError({"Error": {"Code": str(status), "Message": "<html>Bad Gateway</html>"},
                       "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    assert is_outage(err) is outage


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_probes_of_runs_starting_together_do_not_collide(where, tmp_path, request):
    """Two runs on one output each probe it at start: neither may delete the other's probe."""
    from concurrent.futures import ThreadPoolExecutor

    if where == "s3":
        request.getfixturevalue("s3_server")
    out = resolve(str(tmp_path / "out") if where == "local" else "s3://test/probes")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: out.check_writable(), range(32)))  # raises if a probe was deleted under one


@pytest.mark.parametrize("err, reason", [
    (OSError("s3://b/k: AWS Error ACCESS_DENIED during GetObject operation"), "AWS Error ACCESS_DENIED"),
    (FileNotFoundError(2, "No such file", "/archive/DOE^JANE.dcm"), "[Errno 2] No such file or directory"),
    (OSError("[errno 36] File name too long: /archive/DOE^JANE"), "[Errno 36] File name too long"),
    (OSError("read failed at /archive/DOE^JANE.dcm"), "OSError"),
    # A decoder's error quotes header values: only its type, whatever the message looks like.
    (ValueError("bad PatientName 'AWS Error DOE_JANE_MRN8675309'"), "ValueError"),
    (ValueError("[errno 5] in tag (0010,0010) DOE^JANE"), "ValueError"),
])
def test_private_reason_quotes_no_identifier(err, reason):
    assert private_reason(err) == reason
