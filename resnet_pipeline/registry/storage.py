"""Where registry objects live: a small storage interface and its two backends.

`S3Storage` (`s3://bucket/prefix`, through boto3) and `LocalStorage` (a folder) give the same
guarantees, which is all the registry above them relies on:

- `put(key, data, if_none_match=True)` creates `key` only if it does not exist (S3
  `If-None-Match: *`; locally `link(2)` of a complete temporary file, which fails if the name
  exists, so a reader never sees half an object);
- `put(key, data, if_match=etag)` replaces `key` only if it still has that ETag (S3 `If-Match`;
  locally compare and `rename(2)` under an exclusive `flock`);
- a lost condition raises `Conflict`; every other failure a `RegistryError` naming the object.

Both are checked before the first write (`Registry` probes them): an S3-compatible store that ignores
the conditions, or a filesystem without hard links or `flock` (some SMB and FUSE mounts), would let
two writers take the same version or alias silently, so the registry stops with an error instead.
"""

from __future__ import annotations

import builtins
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from resnet_pipeline.registry.transfer import copy_hashing


class RegistryError(RuntimeError):
    """A registry operation could not be done; the message names the model, version, alias or file."""


class Conflict(Exception):
    """A conditional write lost: the object exists (if_none_match) or changed (if_match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the registry root, '/'-separated
    size: int
    last_modified: dt.datetime  # timezone-aware, UTC
    etag: str | None = None  # as the store reports it (S3 ETag; locally size, mtime and inode)


class SizeMismatch(RegistryError):
    """An object is not the size its manifest says (checked before and while it is read)."""


class Storage(Protocol):
    location: str

    def get(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        """(data, etag), or None when the object does not exist; larger than `max_bytes`: RegistryError."""

    def head(self, key: str) -> ObjectInfo | None:
        """Size, time and etag of an object, or None when it does not exist."""

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write `data`; return the new etag; raise Conflict when a condition fails."""

    def upload_file(self, key: str, path: Path) -> str:
        """Store the file; return the object's etag."""

    def download_file(self, key: str, path: Path, size: int | None = None) -> str:
        """Copy the object to `path`; return the sha256 of the bytes written. With `size`, an object of
        another size raises SizeMismatch, and no more than `size` bytes are ever written."""

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def delete(self, keys: builtins.list[str]) -> None: ...

    def url(self, key: str) -> str:
        """The object's address, for messages."""


# ------------------------------------------------------------------------------------ local folder


class LocalStorage:
    """A folder with the registry layout; see the module docstring for the guarantees."""

    LOCKS = ".locks"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.location = str(self.root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if max_bytes is not None and len(data) > max_bytes:
            raise RegistryError(f"{self.url(key)}: larger than {max_bytes} bytes; refusing to read it")
        return data, hashlib.md5(data).hexdigest()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, dt.datetime.fromtimestamp(st.st_mtime, dt.UTC), _local_etag(st))

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        return Path(tmp)

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        tmp = self._tmp(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        path = self._path(key)
        tmp = self._write_tmp(path, data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)  # atomic create-if-absent of a complete file
                except FileExistsError:
                    raise Conflict(key) from None
                except OSError as err:  # EPERM, EOPNOTSUPP, ENOSYS: SMB, some FUSE and FAT mounts
                    raise RegistryError(
                        f"{self.root}: the filesystem does not support hard links "
                        f"(link(2): {os.strerror(err.errno or 0)}); the local registry needs "
                        "them for exclusive version claims"
                    ) from None
            elif if_match is not None:
                with self._lock(key):
                    current = self.get(key)
                    if current is None or current[1] != if_match:
                        raise Conflict(key)
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.md5(data).hexdigest()

    def _lock(self, key: str):
        locks = self.root / self.LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        return _FileLock(locks / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"))

    def upload_file(self, key: str, path: Path) -> str:
        target = self._path(key)
        tmp = self._tmp(target)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return _local_etag(target.stat())

    def download_file(self, key: str, path: Path, size: int | None = None) -> str:
        source = self._path(key)
        if not source.is_file():
            raise RegistryError(f"{source}: object not found")
        if size is not None and source.stat().st_size != size:
            raise SizeMismatch(f"{source}: {source.stat().st_size} bytes, the manifest says {size}")
        digest, copied = copy_hashing(source, path, limit=size)
        if size is not None and copied != size:
            raise SizeMismatch(f"{source}: changed while it was read ({copied} bytes, the manifest says {size})")
        return digest

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != self.LOCKS]
            for fname in filenames:
                if fname.startswith(".") and fname.endswith(".tmp"):
                    continue  # a write in progress
                full = Path(dirpath) / fname
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue
                    when = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)
                    out.append(ObjectInfo(key, st.st_size, when, _local_etag(st)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: builtins.list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def _local_etag(st: os.stat_result) -> str:
    """A local file's identity: it changes when the file is replaced or rewritten."""
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:  # ENOLCK, EOPNOTSUPP: some network and FUSE mounts
            os.close(self.fd)
            raise RegistryError(
                f"{self.path.parent.parent}: the filesystem does not support file locks "
                f"(flock(2): {os.strerror(err.errno or 0)}); the local registry needs them "
                "for alias compare-and-swap"
            ) from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
