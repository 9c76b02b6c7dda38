"""Resumable, retried, checksum-verified downloads and archive extraction that checks every member.

`fetch` streams a URL (http(s), `file://` or a local path) into `<dest>.part` beside `dest`,
resuming with a `Range` request after a dropped connection, and moves it into place only once its
digests match. `safe_extract` unpacks a tar (any compression) or zip after refusing the whole
archive if any member could write outside the destination.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import posixpath
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from tqdm import tqdm

from resnet_pipeline.redact import redact_text, redact_url

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB


class DownloadError(RuntimeError):
    """A download failed for good: bad status, retries exhausted or checksum mismatch."""


class UnsafeArchiveError(ValueError):
    """An archive member would escape the destination or is not a regular file, folder or safe link."""


class _Retryable(Exception):
    """A transient failure worth another attempt (resuming from the bytes already written)."""


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks; `algorithm` is "sha256" or "md5"."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


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
    with open(src, "rb") as fin, open(part, "wb") as fout, tqdm(
        total=src.stat().st_size, unit="B", unit_scale=True, desc=src.name, disable=None
    ) as bar:
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


def _attempt(url: str, part: Path, timeout: float) -> None:
    """One HTTP request appending to (or restarting) `part`; raises _Retryable on transient errors."""
    have = part.stat().st_size if part.exists() else 0
    request = _request(url)
    url = redact_url(url)  # from here on only for messages
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            logger.info("%s: server says range %d- is unsatisfiable; verifying the part file", url, have)
            return
        if e.code == 429 or e.code >= 500:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    with response:
        if have and response.status == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start.strip() != str(have):
                part.unlink(missing_ok=True)
                raise _Retryable(f"asked for bytes {have}- but got Content-Range {start!r}; restarting")
            mode = "ab"
        else:
            if have:
                logger.info("%s: server ignored the Range request; restarting from zero", url)
            mode, have = "wb", 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        total = have + expected if expected is not None else None
        received = 0
        with open(part, mode) as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=None
        ) as bar:
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
                raise _Retryable(f"{type(e).__name__} after {have + received} bytes") from e
        if expected is not None and received < expected:
            raise _Retryable(f"body ended after {received} of {expected} bytes")


def fetch(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
          retries: int = 5, backoff: float = 0.5, timeout: float = 60.0) -> Path:
    """Download url to dest (streaming, 1 MiB chunks), resumable, verified; return dest.

    An existing dest is reused only if it matches a given checksum (with none given it is fetched
    again); otherwise it stays in place until a verified replacement is moved over it.
    """
    dest = Path(dest)
    shown = redact_url(url)  # what logs and errors say: no userinfo, no query (signatures, tokens)
    expected = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if dest.exists():
        if expected and _mismatch(dest, expected) is None:
            logger.info("%s already present and verified; not downloading", dest)
            return dest
        logger.warning("%s exists but is %s; fetching a replacement", dest,
                       "unverifiable (no checksum)" if not expected else "a checksum mismatch")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    local = _local_source(url)
    if local is not None:
        _copy_local(local, part, url)
    elif urlparse(url).scheme not in ("http", "https", "ftp"):
        raise DownloadError(f"{shown}: unsupported URL scheme")
    else:
        for attempt in range(retries + 1):
            try:
                _attempt(url, part, timeout)
                break
            except _Retryable as e:
                if attempt == retries:
                    raise DownloadError(f"{shown}: giving up after {retries + 1} attempts: {redact_text(str(e))}") from None
                delay = backoff * 2**attempt
                logger.warning("%s: %s; retry %d/%d in %.1fs", shown, redact_text(str(e)), attempt + 1, retries, delay)
                time.sleep(delay)

    if not expected:
        logger.warning("%s: no sha256 or md5 given; accepting the download unverified", shown)
    elif bad := _mismatch(part, expected):
        part.unlink(missing_ok=True)
        algorithm, want, got = bad
        raise DownloadError(f"{shown}: {algorithm} mismatch: expected {want}, received {got}")
    os.replace(part, dest)
    logger.info("downloaded %s -> %s", shown, dest)
    return dest


def _absolute(name: str) -> bool:
    """POSIX-absolute, leading backslash, or a Windows drive (`C:`)."""
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha())


class _Checker:
    """Vets members in archive order, following the archive's own symlinks as extraction would."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.links: dict[str, str] = {}  # where a symlink will sit (resolved) -> its target

    def _resolve(self, path: str, depth: int = 0) -> str | None:
        """`path` (relative to dest) with every symlink followed; None if it leaves dest."""
        parts: list[str] = []
        for comp in path.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    return None
                parts.pop()
                continue
            parts.append(comp)
            target = self.links.get("/".join(parts))
            if target is not None:
                if depth > 32 or _absolute(target):
                    return None
                resolved = self._resolve("/".join(parts[:-1] + [target]), depth + 1)
                if resolved is None:
                    return None
                parts = resolved.split("/") if resolved else []
        return "/".join(parts)

    def check(self, name: str, kind: str, linkname: str = "") -> None:
        """Raise UnsafeArchiveError unless member `name` of `kind` (file/dir/sym/hard/dev) is safe."""
        why = None
        if _absolute(name):
            why = "absolute path"
        elif ".." in name.replace("\\", "/").split("/"):
            why = "'..' component"
        elif kind == "dev":
            why = "device file or FIFO"
        elif kind == "sym":
            parent = self._resolve(posixpath.dirname(name.rstrip("/")))
            if parent is None or _absolute(linkname) or self._resolve(posixpath.join(parent, linkname)) is None:
                why = f"symlink to {linkname!r} points outside the destination"
            else:
                self.links[posixpath.join(parent, posixpath.basename(name.rstrip("/")))] = linkname
        elif kind == "hard" and (_absolute(linkname) or self._resolve(linkname) is None):
            why = f"hardlink to {linkname!r} points outside the destination"
        if why is None and kind != "sym" and self._resolve(name) is None:
            why = "path leads outside the destination through a symlink"
        if why:
            raise UnsafeArchiveError(f"{self.archive}: unsafe member {name!r}: {why}")


def _check_tar(archive: Path, tar: tarfile.TarFile) -> None:
    checker = _Checker(archive)
    for m in tar.getmembers():
        kind = "sym" if m.issym() else "hard" if m.islnk() else "dev" if (m.isdev() or m.isfifo()) else "file"
        checker.check(m.name, kind, m.linkname)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "sym"
    return "dev" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) else "file"


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    checker = _Checker(archive)
    for info in zf.infolist():
        kind = _zip_kind(info)
        target = zf.read(info).decode("utf-8", "replace") if kind == "sym" else ""
        checker.check(info.filename, kind, target)


def safe_extract(archive: str | Path, dest: str | Path, *,
                 select: Callable[[str], bool] | None = None) -> list[str]:
    """Extract a .tar / .tar.gz / .tgz / .zip (detected by content, not name) into dest; return member names extracted.

    Every member is checked (even those `select` skips) before anything is written.
    """
    archive, dest = Path(archive), Path(dest)
    keep = select or (lambda name: True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _check_tar(archive, tar)
            members = [m for m in tar.getmembers() if keep(m.name)]
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
        names = [m.name for m in members]
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _check_zip(archive, zf)
            dest.mkdir(parents=True, exist_ok=True)
            names = []
            for info in zf.infolist():
                if not keep(info.filename):
                    continue
                if _zip_kind(info) == "sym":
                    link = dest / info.filename
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.unlink(missing_ok=True)
                    os.symlink(zf.read(info).decode("utf-8"), link)
                else:
                    zf.extract(info, dest)
                names.append(info.filename)
    else:
        raise ValueError(f"{archive}: not a tar or zip archive")
    logger.info("extracted %d members of %s into %s", len(names), archive, dest)
    return names
