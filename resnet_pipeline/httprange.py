"""The one range-resumable HTTP reader: GET a byte range, read it in order, and after a lost
connection ask again from the byte where it stopped, with one retry and backoff rule.

    opened = retry(lambda: open_range(request, start), attempts=5, backoff=0.5)
    read_range(lambda s, e, t: open_range(request, s, e, t), opened, start, opened.total, None, buf, take,
               attempts=5, backoff=0.5)

Used by the downloads of the data stage (`data/fetch.py`, one stream into a `.part` file) and by
the registry's parallel ranged pulls (`registry/transfer.py`, presigned S3 URLs). Stdlib only.
"""

from __future__ import annotations

import http.client
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

CHUNK = 1 << 20
T = TypeVar("T")


class Retryable(Exception):
    """A failure worth asking again for (connection lost, 5xx, throttling)."""


class HTTPStatus(Exception):
    """A final HTTP error status (4xx but 429): asking again would not help."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status, self.reason, self.body = status, reason, body


class BadResponse(ValueError):
    """A response that does not say which bytes it holds."""


@dataclass
class Opened:
    stream: Any  # a binary stream with readinto() and close() (an HTTP response, a file)
    start: int  # offset of the stream's first byte in the object
    total: int | None  # the object's size, when the server says
    etag: str | None


# fetch(start, end_inclusive_or_None, etag_or_None) -> Opened; raises Retryable or a final error
Fetch = Callable[[int, "int | None", "str | None"], Opened]


def retry(
    call: Callable[[], T], attempts: int, backoff: float, on_retry: Callable[[Exception, float], None] | None = None
) -> T:
    """`call()`, again after `backoff * 2**n` seconds while it raises Retryable, `attempts` times in all."""
    for attempt in range(attempts):
        try:
            return call()
        except Retryable as err:
            if attempt + 1 == attempts:
                raise
            delay = backoff * 2**attempt
            if on_retry is not None:
                on_retry(err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_range(
    request: urllib.request.Request,
    start: int = 0,
    end: int | None = None,
    etag: str | None = None,
    *,
    timeout: float = 60.0,
    context: ssl.SSLContext | None = None,
    opener: urllib.request.OpenerDirector | None = None,
) -> Opened:
    """GET bytes start..end (inclusive; None: to the end) of `request`'s URL, `If-Match: etag` if given.

    A request from byte 0 to the end asks for the whole object (no Range). Raises Retryable for a lost
    connection, 429 and 5xx, HTTPStatus for another error status, BadResponse for a 206 without a
    usable Content-Range. A 200 to a Range request (a server that ignores ranges) starts at 0.
    `opener` (its own redirect and TLS handling) replaces urlopen's; then `context` is not used.
    """
    if start or end is not None:
        request.add_header("Range", f"bytes={start}-{'' if end is None else end}")
    if etag:
        request.add_header("If-Match", etag)
    try:
        if opener is not None:
            response = opener.open(request, timeout=timeout)
        else:
            response = urllib.request.urlopen(request, timeout=timeout, context=context)
    except urllib.error.HTTPError as err:
        body = err.read(4096).decode("utf-8", "replace")
        err.close()
        if err.code == 429 or err.code >= 500:
            raise Retryable(f"HTTP {err.code} {err.reason}") from None
        raise HTTPStatus(err.code, str(err.reason), body) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    etag = response.headers.get("ETag")
    if response.status == 206:
        header = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header)
        if not match:
            response.close()
            raise BadResponse(f"unexpected Content-Range {header!r}")
        total = match.group(3)
        return Opened(response, int(match.group(1)), int(total) if total.isdigit() else None, etag)
    length = response.headers.get("Content-Length")
    return Opened(response, 0, int(length) if length is not None and length.isdigit() else None, etag)


def read_range(
    fetch: Fetch,
    opened: Opened | None,
    lo: int,
    hi: int | None,
    etag: str | None,
    buf: memoryview,
    take: Callable[[memoryview, int, int], memoryview],
    *,
    attempts: int,
    backoff: float,
    stop: Callable[[], bool] = lambda: False,
    rewind: Callable[[int], None] | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> memoryview:
    """Read bytes lo..hi (exclusive; None: to the end of the stream) in order, asking `fetch` again from
    where a lost connection stopped. `take(buf, n, pos)` gets each piece (`buf[:n]`, at offset `pos`)
    and returns the buffer to read the next one into; the last buffer is returned. `stop()` ends it
    early. A server that answers from an earlier byte (it ignores Range) is followed if `rewind(start)`
    is given (it drops what was taken from `start` on), else asked again."""
    pos = lo
    current: list[Opened | None] = [opened]

    def once() -> memoryview:
        nonlocal pos, buf
        try:
            got = current[0]
            if got is None:
                got = current[0] = fetch(pos, None if hi is None else hi - 1, etag)
            if got.start != pos:
                if got.start > pos or rewind is None:
                    got.stream.close()
                    raise Retryable(f"asked for bytes from {pos}, the server answered from {got.start}")
                rewind(got.start)
                pos = got.start
            with got.stream as stream:
                while (hi is None or pos < hi) and not stop():
                    n = stream.readinto(buf[: CHUNK if hi is None else min(CHUNK, hi - pos)])
                    if not n:
                        break
                    buf = take(buf, n, pos)
                    pos += n
        except (OSError, http.client.HTTPException) as err:
            current[0] = None
            raise Retryable(f"{type(err).__name__} after byte {pos}") from None
        except Retryable:
            current[0] = None
            raise
        current[0] = None
        if hi is None or pos >= hi or stop():
            return buf
        raise Retryable(f"connection closed at byte {pos}, before byte {hi}")

    try:
        return retry(once, attempts, backoff, on_retry)
    except Retryable as err:
        raise Retryable(f"gave up after {attempts} attempts: {err}") from None
