"""The S3 image-folder download's fetch path (resnet_pipeline/data/s3folder.py): presigned GETs over
keep-alive connections, checked against the listing, against the session's SeaweedFS; faults
SeaweedFS cannot produce (a body cut at every attempt, a 503 that never ends) come from the loopback
HTTP server of tests/httpserver.py."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import re
import ssl
import stat
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from resnet_pipeline.config import DownloadConfig
from resnet_pipeline.data import s3folder, s3get
from resnet_pipeline.data.download import download
from resnet_pipeline.data.fetch import DownloadError
from tests.httpserver import LoopbackHTTPServer, self_signed_cert

SECRET = "test-secret-that-must-not-leak"


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def _put(client, bucket: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def _assert_no_secret(text: str) -> None:
    for secret in ("X-Amz-Signature", "X-Amz-Credential", "Signature=", SECRET):
        assert secret not in text


def test_many_objects_come_down_byte_identical(s3_env, tmp_path, caplog):
    rng = random.Random(3)
    files = {f"many/c{i % 4}/img_{i:03d}.jpg": rng.randbytes(rng.randint(0, 3000)) for i in range(240)}
    files["many/c0/big.jpg"] = rng.randbytes((1 << 20) + 12345)  # more than one read block
    files["many/c1/a b+c%20d&é~.jpg"] = b"odd characters, percent-encoded by the presigner"
    bucket = s3_env.make_bucket("fetch-many")
    _put(s3_env.client(), bucket, files)
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="resnet_pipeline"):
            folder = download(
                DownloadConfig(
                    dataset="imagefolder", path=f"s3://{bucket}/many", s3_workers=8, s3_endpoint_url=s3_env.endpoint_url
                ),
                tmp_path / "raw",
            )
    finally:
        os.umask(old)
    got = {
        f"many/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".complete"
    }
    assert got == files
    assert not list(folder.glob(".s3-parts-*"))  # the temporary names are gone
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.rglob("*.jpg"))
    assert "through get_object" not in caplog.text  # the presigned path did the work


def test_presigned_urls_where_requests_cannot_be_signed_directly(s3_env, tmp_path):
    bucket = s3_env.make_bucket("fetch-presigned")
    files = {f"set/c{i % 2}/{i} +é.jpg": os.urandom(i * 7) for i in range(30)}
    _put(s3_env.client(), bucket, files)
    folder = s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url, 4)
    assert s3get.Signer(folder.client, folder.credentials, bucket, "set/c0/0 +é.jpg").base is not None
    no_credentials = dataclasses.replace(folder, credentials=None)  # e.g. the URL form is not the expected one
    assert s3get.Signer(folder.client, None, bucket, "set/c0/0 +é.jpg").base is None
    assert s3folder.fetch_folder(no_credentials, tmp_path, 4) == 30
    assert {f"set/{p.relative_to(tmp_path).as_posix()}": p.read_bytes() for p in tmp_path.rglob("*.jpg")} == files


def test_an_object_of_another_size_than_listed_is_refused(s3_env, tmp_path):
    bucket = s3_env.make_bucket("fetch-size")
    client = s3_env.client()
    _put(client, bucket, {f"set/c0/{i}.jpg": b"x" * 100 for i in range(5)})
    folder = s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url, 4)
    client.put_object(Bucket=bucket, Key="set/c0/3.jpg", Body=b"y" * 150)  # replaced after the listing
    with pytest.raises(DownloadError, match=rf"s3://{bucket}/set/c0/3.jpg: 150 bytes received, the listing says 100"):
        s3folder.fetch_folder(folder, tmp_path, 4)
    assert not (tmp_path / "c0" / "3.jpg").exists()


def test_an_object_gone_after_the_listing_names_its_key(s3_env, tmp_path, caplog):
    """A 404 goes to botocore's get_object (the plain GET hands over what it does not handle)."""
    bucket = s3_env.make_bucket("fetch-gone")
    client = s3_env.client()
    _put(client, bucket, {f"set/c0/{i}.jpg": b"x" * 10 for i in range(3)})
    folder = s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url, 2)
    client.delete_object(Bucket=bucket, Key="set/c0/1.jpg")
    with caplog.at_level(logging.DEBUG, logger="resnet_pipeline"), pytest.raises(DownloadError) as err:
        s3folder.fetch_folder(folder, tmp_path, 2)
    assert str(err.value).startswith(f"s3://{bucket}/set/c0/1.jpg: ") and "NoSuchKey" in str(err.value)
    _assert_no_secret(str(err.value) + caplog.text)


def test_two_keys_naming_one_file_are_refused_before_any_fetch(tmp_path):
    with pytest.raises(ValueError, match=r"object keys 'set/c0/a.jpg' and 'set/c0//a.jpg' under s3://b/set name"):
        s3folder.plan({"set/c0/a.jpg": 1, "set/c0//a.jpg": 1}, "set/", tmp_path, "s3://b/set")


def test_a_dot_dot_key_is_refused_by_the_listing(s3_env):
    """SeaweedFS refuses `..` keys at PUT, so the refusal is shown on a listing that holds one
    (tests/data/test_sources.py); here: a key that merely contains dots is accepted."""
    bucket = s3_env.make_bucket("fetch-dots")
    _put(s3_env.client(), bucket, {"set/c0/a..b.jpg": b"1", "set/c0/..hidden.jpg": b"2"})
    folder = s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url)
    assert folder.objects == {"set/c0/a..b.jpg": 1, "set/c0/..hidden.jpg": 1}


def _double_folder(server: LoopbackHTTPServer, objects: dict[str, int]) -> s3folder.S3Folder:
    """An S3Folder whose client signs for the loopback HTTP server (no listing: it is not S3)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=server.url(""),
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    return s3folder.S3Folder("s3://b/set", "b", "set/", objects, {"c0": len(objects)}, client, None)


def test_a_body_cut_once_is_fetched_again(tmp_path):
    data = os.urandom(5000)
    with LoopbackHTTPServer({"/b/set/c0/a.jpg": data}) as server:
        server.drop_after["/b/set/c0/a.jpg"] = 1000
        assert s3folder.fetch_folder(_double_folder(server, {"set/c0/a.jpg": 5000}), tmp_path, 2, backoff=0.01) == 1
        assert len(server.requests) == 2
    assert (tmp_path / "c0" / "a.jpg").read_bytes() == data


@pytest.mark.parametrize("fault", ["cut", "503"])
def test_a_fault_that_lasts_is_retried_then_names_the_key(tmp_path, caplog, fault):
    """The loopback HTTP server cuts the body (or answers 503) at every attempt: SeaweedFS cannot be
    made to do either on demand."""
    with LoopbackHTTPServer({"/b/set/c0/a.jpg": b"z" * 5000, "/b/set/c0/b.jpg": b"ok"}) as server:
        if fault == "cut":
            server.drop_always["/b/set/c0/a.jpg"] = 100
        else:
            server.status["/b/set/c0/a.jpg"] = 503
        folder = _double_folder(server, {"set/c0/a.jpg": 5000, "set/c0/b.jpg": 2})
        with caplog.at_level(logging.DEBUG, logger="resnet_pipeline"), pytest.raises(DownloadError) as err:
            s3folder.fetch_folder(folder, tmp_path, 1, retries=2, backoff=0.01)
        attempts = [p for p, _ in server.requests if p == "/b/set/c0/a.jpg"]
    message = str(err.value)
    assert message.startswith("s3://b/set/c0/a.jpg: giving up after 3 attempts: ")
    assert ("body cut after 100 of 5000 bytes" if fault == "cut" else "HTTP 503") in message
    assert len(attempts) == 3 and caplog.text.count("s3://b/set/c0/a.jpg: ") == 2  # two retries logged
    _assert_no_secret(message + caplog.text)
    assert not (tmp_path / "c0" / "a.jpg").exists()


def test_a_proxy_or_client_certificate_sends_everything_through_get_object(monkeypatch):
    import boto3
    from botocore.config import Config

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "storage.internal")
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b"
    )
    assert s3get.plain_get_refused(client, "http://127.0.0.1:9000/b/k") == "a proxy is configured"
    assert s3get.plain_get_refused(client, "http://storage.internal/b/k") is None
    assert s3get.plain_get_refused(client, "https://127.0.0.1:9000/b/k") is None  # no HTTPS proxy
    with_cert = boto3.session.Session().client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        config=Config(client_cert="/c.pem"),
    )
    assert s3get.plain_get_refused(with_cert, "https://s3.example/b/k") == "a client certificate is configured"


def test_the_ca_bundle_is_the_one_botocore_uses(s3_env, monkeypatch, tmp_path):
    from botocore.httpsession import get_cert_path

    bucket = s3_env.make_bucket("fetch-ca")
    _put(s3_env.client(), bucket, {"set/c0/a.jpg": b"1"})
    (tmp_path / "ca.pem").write_text("")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    assert s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url).ca_bundle == str(tmp_path / "ca.pem")
    monkeypatch.delenv("AWS_CA_BUNDLE")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))  # no ca_bundle there either
    assert s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url).ca_bundle == get_cert_path(True)


def test_a_refused_signature_is_asked_again_through_get_object(s3_env, tmp_path):
    """A 403 on the plain GET (here: signed with a wrong secret) goes to botocore's get_object."""
    from botocore.credentials import Credentials

    bucket = s3_env.make_bucket("fetch-403")
    _put(s3_env.client(), bucket, {"set/c0/a.jpg": b"payload"})
    folder = s3folder.list_folder(f"s3://{bucket}/set", s3_env.endpoint_url)
    signer = s3get.Signer(folder.client, Credentials(s3_env.access_key, SECRET), bucket, "set/c0/a.jpg")
    fetcher = s3get.Fetcher(folder.client, signer, None, 0, 0.01)
    obj = s3get.S3Object("set/c0/a.jpg", 7, tmp_path / "a.jpg")
    with pytest.raises(s3get.AskBotocore, match="HTTP 403"):
        fetcher._get(obj, tmp_path / "part")
    fetcher.fetch(obj, tmp_path / "part")
    fetcher.close()
    assert (tmp_path / "a.jpg").read_bytes() == b"payload"


@contextlib.contextmanager
def _one_object_server(body: bytes, headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None):
    """A loopback server answering every GET with `body` and `headers` (HTTPS with `tls`); yields
    an S3Folder of one object `set/c0/a.jpg` whose client signs for it."""
    import boto3
    from botocore.config import Config

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's spelling
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}",
            aws_access_key_id="AKIDTEST",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(signature_version="s3v4"),
        )
        yield s3folder.S3Folder("s3://b/set", "b", "set/", {"set/c0/a.jpg": len(body)}, {"c0": 1}, client, None)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tls_is_verified_with_the_ca_bundle(tmp_path):
    """An HTTPS loopback server with a self-signed certificate (SeaweedFS here serves plain HTTP):
    refused by the default trust store, accepted with that certificate as the CA bundle."""
    cert, key = self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with _one_object_server(b"hello", tls=context) as folder:
        with pytest.raises(DownloadError, match=r"^s3://b/set/c0/a.jpg: TLS certificate not trusted"):
            s3folder.fetch_folder(folder, tmp_path / "untrusted", 1, retries=3, backoff=0.01)
        trusted = dataclasses.replace(folder, ca_bundle=str(cert))
        assert s3folder.fetch_folder(trusted, tmp_path / "trusted", 1) == 1
    assert (tmp_path / "trusted" / "c0" / "a.jpg").read_bytes() == b"hello"


def test_the_stored_checksum_is_checked_like_get_object_does(tmp_path, caplog):
    """A loopback server sends the body with a checksum header (SeaweedFS sends the right one, as
    in the tests above; a wrong one has to come from a double)."""
    body = b"image bytes"
    right = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    with _one_object_server(body, {"x-amz-checksum-crc32": right}) as folder:
        assert s3folder.fetch_folder(folder, tmp_path / "ok", 1) == 1
    with _one_object_server(body, {"x-amz-checksum-crc32": "AAAAAA=="}) as folder:
        with pytest.raises(
            DownloadError,
            match=rf"^s3://b/set/c0/a.jpg: giving up after 2 attempts: crc32 checksum "
            rf"{re.escape(right)} received, the object's is AAAAAA==",
        ):
            s3folder.fetch_folder(folder, tmp_path / "bad", 1, retries=1, backoff=0.01)
    assert not (tmp_path / "bad" / "c0" / "a.jpg").exists()
    sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
    with _one_object_server(body, {"x-amz-checksum-sha256": sha, "x-amz-checksum-crc32c": "ignored=="}) as folder:
        assert s3folder.fetch_folder(folder, tmp_path / "sha", 1) == 1
