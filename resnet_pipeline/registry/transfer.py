"""Download one object in parallel ranged GETs and compute its sha256 in the same pass.

`download(fetch, path, ...)` asks `fetch(start, end, etag)` for byte ranges of `part_size`, up to
`concurrency` at a time, and writes them in place (`os.pwrite`) as they arrive. Meanwhile the
calling thread hashes the object in order, following the parts as they arrive, so that verification
overlaps the transfer instead of reading the whole file again after it.

The first GET asks for the first part and learns the object's size and ETag from its
`Content-Range`; the other parts are asked with `If-Match` on that ETag, so an object replaced in
the middle of a download fails instead of being stitched together. A part whose connection fails
is asked again from where it stopped (`Retryable` errors, `attempts` times, with backoff: the reader
of `resnet_pipeline.httprange`).
The part being hashed hands its 1 MB receive buffers straight to the hasher; the bytes of a part
that arrived before its turn are read back from the file. Memory stays at a few 1 MB buffers per
connection whatever the file's size.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from resnet_pipeline.httprange import CHUNK, Fetch, Opened, Retryable, read_range, retry

__all__ = ["Fetch", "Opened", "Retryable", "WrongSize", "copy_hashing", "copy_stream_hashing", "download"]

HASH_CHUNK = 8 * CHUNK
BUFFERS = 4  # per connection


class WrongSize(Exception):
    """The object is not the size the caller expects; nothing of it was written."""


@dataclass
class _Part:
    lo: int
    hi: int  # exclusive
    written: int = 0  # bytes of this part on disk, from lo
    live: bool = False  # being hashed: the receiver hands its buffers to the hasher
    buffers: queue.Queue | None = None  # the receiver's free buffers


def download(
    fetch: Fetch,
    path: str | Path,
    *,
    part_size: int = 16 * CHUNK,
    concurrency: int = 4,
    attempts: int = 5,
    backoff: float = 0.5,
    size: int | None = None,
) -> tuple[str, int]:
    """Write the object to `path`; return (sha256 hex, size). On failure `path` may hold part of it.
    With `size`, an object the server says is of another size raises WrongSize before any byte is
    written, and no more than `size` bytes are read whatever the server sends."""
    first = retry(lambda: fetch(0, part_size - 1, None), attempts, backoff)
    total, etag = first.total, first.etag
    if total is None:
        first.stream.close()
        raise ValueError("the server did not say the size of the object")
    if first.start != 0:
        first.stream.close()
        raise ValueError(f"asked for bytes from 0, the server answered from {first.start}")
    if size is not None and total != size:
        first.stream.close()
        raise WrongSize(f"the server has {total} bytes, the manifest says {size}")
    if total <= part_size:
        return _download_one(fetch, first, path, attempts, backoff), total
    parts = [_Part(lo, min(total, lo + part_size)) for lo in range(0, total, part_size)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    lock = threading.Lock()
    handed: queue.Queue = queue.Queue()  # (part, buffer, n) of the live part, in order; None on a failure
    failures: list[BaseException] = []

    def receive(part: _Part, opened: Opened | None) -> None:
        part.buffers = queue.Queue()
        for _ in range(BUFFERS):
            part.buffers.put(memoryview(bytearray(CHUNK)))

        def take(buf: memoryview, n: int, pos: int) -> memoryview:
            os.pwrite(fd, buf[:n], pos)
            with lock:
                part.written = pos + n - part.lo
                live = part.live
            if not live:
                return buf
            handed.put((part, buf, n))  # the hasher takes this buffer as it is: no second read of the bytes
            assert part.buffers is not None
            return part.buffers.get()

        try:
            last = read_range(
                fetch,
                opened,
                part.lo,
                part.hi,
                etag,
                part.buffers.get(),
                take,
                attempts=attempts,
                backoff=backoff,
                stop=lambda: bool(failures),
            )
            part.buffers.put(last)
        except BaseException as err:
            failures.append(err)
            handed.put(None)

    digest = hashlib.sha256()
    try:
        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="pull") as pool:
            try:
                for i, part in enumerate(parts):
                    pool.submit(receive, part, first if i == 0 else None)
                if not parts:
                    first.stream.close()
                for part in parts:
                    with lock:  # from now on the receiver hands over what it writes
                        part.live, hashed = True, part.written
                    done = 0
                    while done < hashed:  # what arrived before the part became live: read it back
                        data = os.pread(fd, min(hashed - done, HASH_CHUNK), part.lo + done)
                        digest.update(data)
                        done += len(data)
                    while hashed < part.hi - part.lo:
                        item = handed.get()
                        if item is None:
                            raise failures[0]
                        owner, buf, n = item
                        digest.update(buf[:n])
                        hashed += n
                        owner.buffers.put(buf)
            except BaseException as err:
                failures.append(err)  # tells the receivers to stop
                for part in parts:  # and unblocks any waiting for a buffer
                    if part.buffers is not None:
                        part.buffers.put(memoryview(bytearray(CHUNK)))
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        os.close(fd)
    return digest.hexdigest(), total


def _download_one(fetch: Fetch, opened: Opened, path: str | Path, attempts: int, backoff: float) -> str:
    """The whole object in one stream: receive, write and hash each 1 MB in turn in this thread."""
    digest = hashlib.sha256()
    with _create(path) as out:  # writes of 1 MB bypass its buffer

        def take(buf: memoryview, n: int, pos: int) -> memoryview:
            out.write(buf[:n])
            digest.update(buf[:n])
            return buf

        read_range(
            fetch,
            opened,
            0,
            opened.total,
            opened.etag,
            memoryview(bytearray(CHUNK)),
            take,
            attempts=attempts,
            backoff=backoff,
        )
    return digest.hexdigest()


def copy_hashing(source: str | Path, target: str | Path, limit: int | None = None) -> tuple[str, int]:
    """Copy a local file, computing its sha256 on the way; return (sha256 hex, size). With `limit`, at
    most `limit` bytes are copied, and the size returned is limit + 1 when the source has more."""
    with open(source, "rb") as src:
        return copy_stream_hashing(src, target, limit)


def copy_stream_hashing(src: BinaryIO, target: str | Path, limit: int | None = None) -> tuple[str, int]:
    """`copy_hashing` from an open binary file. `target` is created (not followed if it is a link),
    mode 0666 less the umask."""
    digest, size = hashlib.sha256(), 0
    with _create(target) as dst:
        while chunk := src.read(HASH_CHUNK if limit is None else min(HASH_CHUNK, limit - size + 1)):
            if limit is not None and size + len(chunk) > limit:
                return digest.hexdigest(), limit + 1
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _create(path: str | Path) -> BinaryIO:
    """`path` opened for writing, truncated; a link there is refused (ELOOP), never followed."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), "wb")
