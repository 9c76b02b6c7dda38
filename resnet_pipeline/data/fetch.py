"""Resumable, retried, checksum-verified downloads and archive extraction that checks every member.

`fetch` streams a URL (http(s), `file://` or a local path) into `<dest>.part` beside `dest`,
resuming with a `Range` request after a dropped connection (`resnet_pipeline.httprange`, the
reader the registry's pulls use too), and moves it into place only once its digests match.
`safe_extract` (from `archive`, re-exported here) unpacks a tar or zip after vetting every member.

A download is bounded while its bytes arrive (`DownloadLimits`: size, total time, minimum rate);
a watch thread shuts the connection when a time bound passes, so no read blocks past it. Redirects
never carry the URL's credentials to another scheme, host or port, and https -> http is refused
(`resnet_pipeline.data.bounded`).
"""

from __future__ import annotations

import base64
import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from tqdm import tqdm

from resnet_pipeline.data.archive import ArchiveLimits, UnsafeArchiveError, safe_extract  # noqa: F401
from resnet_pipeline.data.bounded import Counted, DownloadLimits, Redirects, Refused, TooLarge, Watch, bounded_opener
from resnet_pipeline.fileio import file_digest  # noqa: F401 - also part of this module's API
from resnet_pipeline.httprange import (
    CHUNK,
    BadResponse,
    Fetch,
    HTTPStatus,
    Opened,
    Retryable,
    open_range,
    read_range,
    retry,
)
from resnet_pipeline.redact import redact_text, redact_url

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download failed for good: bad status, retries exhausted, a bound passed or checksum mismatch."""


def _mismatch(path: Path, expected: dict[str, str]) -> tuple[str, str, str] | None:
    """First (algorithm, expected, received) that does not match, or None if all match."""
    for algorithm, want in expected.items():
        got = file_digest(path, algorithm)
        if got.lower() != want.lower():
            return algorithm, want, got
    return None


def _local_source(url: str) -> Path | None:
    """The local path for a `file://` URL or a plain path; None for a network URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return Path(url)
    return None


def _copy_local(src: Path, part: Path, url: str) -> None:
    if not src.is_file():
        raise DownloadError(f"{redact_url(url)}: no such file {src}")
    with (
        open(src, "rb") as fin,
        open(part, "wb") as fout,
        tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=src.name, disable=None) as bar,
    ):
        for block in iter(lambda: fin.read(CHUNK), b""):
            fout.write(block)
            bar.update(len(block))


def _request(url: str) -> urllib.request.Request:
    """A GET of `url`; `user:pass@` in it becomes a Basic Authorization header (urllib sends none)."""
    parts = urlsplit(url)
    headers = {"User-Agent": "resnet-pipeline"}
    if parts.username is not None or parts.password is not None:
        userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return urllib.request.Request(url, headers=headers)


def _download(url: str, part: Path, *, retries: int, backoff: float, timeout: float, limits: DownloadLimits) -> None:
    """Stream `url` into `part`, resuming after the bytes already there (httprange's reader and
    retries), within `limits`; errors name the (redacted) URL that failed, after any redirect."""
    shown = redact_url(url)  # for messages only
    have = part.stat().st_size if part.exists() else 0
    if have > limits.max_bytes:
        logger.warning("%s: the partial file holds more than %s; starting again", part, limits.size_text())
        part.unlink()
        have = 0
    redirects = Redirects(url)

    def failed(text: str) -> DownloadError:
        where = redact_url(redirects.url)
        return DownloadError(f"{where}: {text}" + (f" (redirected from {shown})" if where != shown else ""))

    with Watch(limits) as watch:
        opener = bounded_opener(watch, redirects)

        def get(start: int, end: int | None, etag: str | None) -> Opened:  # always to the end: `bytes=N-`
            watch.check()
            redirects.url = url
            wait = max(min(timeout, watch.remaining()), 0.001)
            opened = open_range(_request(url), start, None, etag, timeout=wait, opener=opener)
            if opened.total is not None and opened.total > limits.max_bytes:
                opened.stream.close()
                raise Refused(
                    f"the server announces Content-Length {opened.total:,} bytes, more than "
                    f"{limits.size_text()}; refused before the body (raise the limit in params.yaml if "
                    "the file is trusted and that large)"
                )
            opened.stream = Counted(opened.stream, watch)
            return opened

        def on_retry(err: Exception, delay: float) -> None:
            logger.warning("%s: %s; retrying in %.1fs", redact_url(redirects.url), redact_text(str(err)), delay)

        try:
            try:
                opened = retry(lambda: get(have, None, None), retries + 1, backoff, on_retry)
            except HTTPStatus as e:
                if e.status == 416 and have:
                    logger.info("%s: server says range %d- is unsatisfiable; verifying the part file", shown, have)
                    return
                raise failed(f"HTTP {e.status} {e.reason}") from None
            except (Retryable, BadResponse) as e:
                raise failed(f"giving up after {retries + 1} attempts: {redact_text(str(e))}") from None
            _read(opened, part, have, limits, get, retries=retries, backoff=backoff, on_retry=on_retry)
        except TooLarge as e:
            part.unlink(missing_ok=True)
            raise failed(str(e)) from None
        except Refused as e:
            raise failed(str(e)) from None
        except Retryable as e:
            raise failed(f"giving up after {retries + 1} attempts: {redact_text(str(e))}") from None


def _read(
    opened: Opened,
    part: Path,
    have: int,
    limits: DownloadLimits,
    get: Fetch,
    *,
    retries: int,
    backoff: float,
    on_retry: Callable[[Exception, float], None],
) -> None:
    """The body into `part` from byte `have`, never past `limits.max_bytes`, with a progress bar."""
    total = opened.total
    with (
        open(part, "r+b" if have else "wb") as f,
        tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=None) as bar,
    ):

        def take(buf: memoryview, n: int, pos: int) -> memoryview:
            if pos + n > limits.max_bytes:
                raise TooLarge(
                    f"more than {limits.size_text()} arrived (a body without end?); stopped at byte {pos:,}, "
                    "before the limit, and removed the partial file"
                )
            f.seek(pos)
            f.write(buf[:n])
            bar.update(n)
            return buf

        def rewind(start: int) -> None:
            logger.info("%s: server ignored the Range request; restarting from byte %d", part.name[:-5], start)
            f.seek(start)
            f.truncate()
            bar.reset(total=bar.total)

        read_range(
            get,
            opened,
            have,
            total,
            None,
            memoryview(bytearray(CHUNK)),
            take,
            attempts=retries + 1,
            backoff=backoff,
            rewind=rewind,
            on_retry=on_retry,
        )


def fetch(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 60.0,
    limits: DownloadLimits | None = None,
) -> Path:
    """Download url to dest (streaming, 1 MiB chunks), resumable, verified, bounded; return dest.

    An existing dest is reused only if it matches a given checksum (with none given it is fetched
    again); otherwise it stays in place until a verified replacement is moved over it. `timeout` is
    per connection attempt and read; `limits` (default: the params' defaults) bound the whole download.
    """
    dest = Path(dest)
    shown = redact_url(url)  # what logs and errors say: no userinfo, no query (signatures, tokens)
    expected = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if dest.exists():
        if expected and _mismatch(dest, expected) is None:
            logger.info("%s already present and verified; not downloading", dest)
            return dest
        logger.warning(
            "%s exists but is %s; fetching a replacement",
            dest,
            "unverifiable (no checksum)" if not expected else "a checksum mismatch",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    local = _local_source(url)
    if local is not None:
        _copy_local(local, part, url)
    elif urlparse(url).scheme not in ("http", "https", "ftp"):
        raise DownloadError(f"{shown}: unsupported URL scheme")
    else:
        _download(url, part, retries=retries, backoff=backoff, timeout=timeout, limits=limits or DownloadLimits())

    if not expected:
        logger.warning("%s: no sha256 or md5 given; accepting the download unverified", shown)
    elif bad := _mismatch(part, expected):
        part.unlink(missing_ok=True)
        algorithm, want, got = bad
        raise DownloadError(f"{shown}: {algorithm} mismatch: expected {want}, received {got}")
    os.replace(part, dest)
    logger.info("downloaded %s -> %s", shown, dest)
    return dest
