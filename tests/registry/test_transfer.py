"""Downloads in parallel ranged GETs, hashed in the same pass (registry/transfer.py).

Against the session's SeaweedFS: objects of many parts, one part, and no bytes, through the S3
storage. Lost connections cannot be caused on a real server at a chosen byte, so the retry test
uses a fault-injecting `fetch` over a local file (a test double, said here as the standards ask).
"""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from resnet_pipeline.registry import open_registry
from resnet_pipeline.registry.storage import RegistryError
from resnet_pipeline.registry.transfer import Opened, Retryable, download

KB = 1024


@pytest.mark.s3
@pytest.mark.parametrize(
    "size, part, connections",
    [
        (5 * 1024 * KB + 123, 1024 * KB, 3),  # 6 parts over 3 connections
        (700 * KB, 1024 * KB, 4),  # one part: a single stream
        (0, 1024 * KB, 2),  # an empty object has no byte 0 to ask for
    ],
)
def test_s3_download_writes_the_object_and_its_sha256(s3_location, tmp_path, size, part, connections):
    storage = open_registry(s3_location).storage
    storage.download_part_size, storage.download_concurrency = part, connections
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    storage.upload_file("blob.bin", source)

    digest = storage.download_file("blob.bin", tmp_path / "copy.bin")
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "copy.bin").read_bytes() == data


@pytest.mark.s3
def test_s3_download_of_a_missing_object_names_it(s3_location, tmp_path):
    storage = open_registry(s3_location).storage
    with pytest.raises(RegistryError, match=r"s3://.*/registry/nowhere\.bin: object not found"):
        storage.download_file("nowhere.bin", tmp_path / "x")


class _Flaky:
    """`fetch` over bytes in memory whose streams break after `break_after` bytes, `breaks` times."""

    def __init__(self, data: bytes, breaks: int, break_after: int):
        self.data, self.breaks, self.break_after = data, breaks, break_after
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, start: int, end: int | None, etag: str | None) -> Opened:
        self.calls.append((start, end))
        stop = len(self.data) if end is None else min(len(self.data), end + 1)
        body = self.data[start:stop]
        if self.breaks > 0:
            self.breaks -= 1
            body = body[: self.break_after]  # the connection closes early
        return Opened(io.BytesIO(body), start, len(self.data), '"etag"')


@pytest.mark.parametrize("part", [64 * KB, 1024 * KB])  # several parts / one stream
def test_broken_connections_are_resumed_from_where_they_stopped(tmp_path, part):
    data = os.urandom(300 * KB + 7)
    fetch = _Flaky(data, breaks=2, break_after=10 * KB)
    digest, size = download(fetch, tmp_path / "out", part_size=part, concurrency=2, backoff=0.01)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "out").read_bytes() == data
    resumed = [start for start, _ in fetch.calls if start % part]
    assert len(resumed) == 2, fetch.calls  # asked again from inside a part, not from its start


def test_a_connection_that_keeps_breaking_gives_up_with_the_reason(tmp_path):
    fetch = _Flaky(os.urandom(200 * KB), breaks=100, break_after=KB)
    with pytest.raises(Retryable, match="gave up after 3 attempts: connection closed at byte"):
        download(fetch, tmp_path / "out", part_size=64 * KB, concurrency=2, attempts=3, backoff=0.01)
