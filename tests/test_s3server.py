"""Smoke test of tests/s3server.py: a real SeaweedFS (`weed mini`) S3 server on loopback.

Documents what SeaweedFS 4.48 supports for the pipeline's needs: put/get/list, multipart upload
via boto3's transfer manager with botocore's default checksums, conditional writes (If-None-Match
and If-Match on PutObject), signature checking, persistence across restart, and connection
errors while stopped.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.s3server import PORT_FLAGS, SeaweedS3, SeaweedS3Error

MB = 1024 * 1024


def unique_bucket(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_list(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket(unique_bucket())
    for key in ("a/1.txt", "a/2.txt", "b/3.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

    assert s3.get_object(Bucket=bucket, Key="a/2.txt")["Body"].read() == b"a/2.txt"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/1.txt", "a/2.txt"]
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="missing")
    assert error_code(excinfo) == ("NoSuchKey", 404)


def test_default_checksums_accepted(s3_server):
    """boto3 >= 1.36 sends CRC32 checksums by default; SeaweedFS 4.48 accepts and echoes them."""
    s3 = s3_server.client()
    assert s3.meta.config.request_checksum_calculation == "when_supported"
    bucket = s3_server.make_bucket(unique_bucket())
    response = s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    assert "ChecksumCRC32" in response
    assert s3.get_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")["Body"].read() == b"hello"


def test_multipart_upload_file(s3_server, tmp_path):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket(unique_bucket())
    data = os.urandom(20 * MB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    config = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    s3.upload_file(str(source), bucket, "big.bin", Config=config)

    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-4")  # 4 parts of 5 MB: really multipart
    target = tmp_path / "back.bin"
    s3.download_file(bucket, "big.bin", str(target))
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_conditional_put_if_none_match(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket(unique_bucket())
    s3.put_object(Bucket=bucket, Key="lock", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="lock", Body=b"second", IfNoneMatch="*")
    assert error_code(excinfo) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"first"


def test_conditional_put_if_match(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket(unique_bucket())
    etag = s3.put_object(Bucket=bucket, Key="doc", Body=b"v1")["ETag"]

    new_etag = s3.put_object(Bucket=bucket, Key="doc", Body=b"v2", IfMatch=etag)["ETag"]
    assert new_etag != etag
    with pytest.raises(ClientError) as excinfo:  # `etag` is stale now
        s3.put_object(Bucket=bucket, Key="doc", Body=b"v3", IfMatch=etag)
    assert error_code(excinfo) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="doc")["Body"].read() == b"v2"


def test_authentication_enforced(s3_server):
    import boto3
    from botocore import UNSIGNED

    def client(**kwargs):
        return boto3.session.Session().client(
            "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1", **kwargs
        )

    wrong_secret = client(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    with pytest.raises(ClientError) as excinfo:
        wrong_secret.list_buckets()
    assert error_code(excinfo)[0] == "SignatureDoesNotMatch"

    anonymous = client(config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as excinfo:
        anonymous.list_buckets()
    assert error_code(excinfo)[0] == "AccessDenied"


def test_restart_persists_and_stopped_server_refuses(s3_server, tmp_path):
    """Runs its own server (alongside the session one: ports must not collide)."""
    with SeaweedS3(tmp_path / "own") as server:
        assert set(server.ports.values()).isdisjoint(s3_server.ports.values())
        assert len(set(server.ports.values())) == len(PORT_FLAGS)
        s3 = server.client(retries={"max_attempts": 1}, connect_timeout=2)
        bucket = server.make_bucket(unique_bucket())
        s3.put_object(Bucket=bucket, Key="keep", Body=b"persisted")
        ports = dict(server.ports)

        server.restart()
        assert server.ports == ports
        assert s3.get_object(Bucket=bucket, Key="keep")["Body"].read() == b"persisted"

        server.stop()
        assert not server.running
        with pytest.raises(EndpointConnectionError):
            s3.get_object(Bucket=bucket, Key="keep")

        server.restart()  # from stopped: same ports again, same data
        assert s3.get_object(Bucket=bucket, Key="keep")["Body"].read() == b"persisted"
    assert not server.running
    assert (tmp_path / "own" / "weed.log").is_file()


def test_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedS3Error, match="'weed' not found"):
        SeaweedS3(tmp_path / "data")


def test_failed_startup_reports_log(tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: refusing to start' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = SeaweedS3(tmp_path / "data", weed=fake)
    with pytest.raises(SeaweedS3Error, match="(?s)exited with code 3.*fake weed: refusing to start"):
        server.start()
    assert not server.running
