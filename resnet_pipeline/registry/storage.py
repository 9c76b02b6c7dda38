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

A local folder is trusted for its bytes, not its shape: whoever can write it can plant a symlink or
a FIFO, so `LocalStorage` opens every path under it one part at a time without following links,
regular files only (`localfs`), and refuses anything else naming it. Its files and folders get the
permissions the umask asks for, so a team sharing the folder can read each other's versions.
"""

from __future__ import annotations

import builtins
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from resnet_pipeline.registry.errors import Conflict, RegistryError, SizeMismatch
from resnet_pipeline.registry.localfs import Folder, Tree, fsync_fd, split
from resnet_pipeline.registry.transfer import copy_stream_hashing

__all__ = ["Conflict", "LocalStorage", "ObjectInfo", "RegistryError", "SizeMismatch", "Storage"]


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the registry root, '/'-separated
    size: int
    last_modified: dt.datetime  # timezone-aware, UTC
    etag: str | None = None  # as the store reports it (S3 ETag; locally size, mtime and inode)


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
    """A folder with the registry layout; see the module docstring for the guarantees.

    The folder is trusted for its bytes, not its shape: every path under it is opened one part at a
    time without following links, regular files only (`localfs`), so a planted symlink or FIFO is
    refused naming it. Files and folders get the permissions the umask asks for."""

    LOCKS = ".locks"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.location = str(self.root)
        self.tree = Tree(self.root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def _read(fd: int, max_bytes: int | None) -> bytes:
        with os.fdopen(fd, "rb") as f:
            return f.read() if max_bytes is None else f.read(max_bytes + 1)

    def _checked(self, key: str, data: bytes, max_bytes: int | None) -> tuple[bytes, str]:
        if max_bytes is not None and len(data) > max_bytes:
            raise RegistryError(f"{self.url(key)}: larger than {max_bytes} bytes; refusing to read it")
        return data, hashlib.md5(data).hexdigest()

    def get(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        fd = self.tree.open_file(key)
        return None if fd is None else self._checked(key, self._read(fd, max_bytes), max_bytes)

    def head(self, key: str) -> ObjectInfo | None:
        st = self.tree.lstat(key)
        if st is None:
            return None
        return ObjectInfo(key, st.st_size, dt.datetime.fromtimestamp(st.st_mtime, dt.UTC), _local_etag(st))

    def _new_tmp(self, folder: Folder, name: str) -> tuple[str, int]:
        """A new temporary file beside `name` (a name `list` skips), open for writing, mode per the umask."""
        for _ in range(100):
            tmp = f".{name[:200]}.{secrets.token_hex(4)}.tmp"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                return tmp, os.open(tmp, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder.fd)
            except FileExistsError:
                continue
        raise RegistryError(f"{folder.path}: cannot create a temporary file for {name}")

    def _write_tmp(self, folder: Folder, name: str, write) -> tuple[str, os.stat_result]:
        """A complete, flushed temporary file beside `name`, filled by `write(file)`; (its name, its stat)."""
        tmp, fd = self._new_tmp(folder, name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
        except BaseException:
            _unlink_at(folder, tmp)
            raise
        return tmp, st

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        *parent, name = split(key)
        with self.tree.folder(parent, create=True) as folder:
            assert folder is not None
            tmp, _ = self._write_tmp(folder, name, lambda f: f.write(data))
            try:
                if if_none_match:
                    try:  # atomic create-if-absent of a complete file
                        os.link(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd, follow_symlinks=False)
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
                        fd = self.tree.open_at(folder, name)
                        current = None if fd is None else self._checked(key, self._read(fd, None), None)
                        if current is None or current[1] != if_match:
                            raise Conflict(key)
                        os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
                else:
                    os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            finally:
                _unlink_at(folder, tmp)
            fsync_fd(folder.fd)
        return hashlib.md5(data).hexdigest()

    def _lock(self, key: str) -> _FileLock:
        return _FileLock(self, self.LOCKS, hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")

    def upload_file(self, key: str, path: Path) -> str:
        *parent, name = split(key)
        with self.tree.folder(parent, create=True) as folder, open(path, "rb") as source:
            assert folder is not None
            tmp, st = self._write_tmp(folder, name, lambda f: shutil.copyfileobj(source, f, 1 << 20))
            try:
                os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            finally:
                _unlink_at(folder, tmp)
            fsync_fd(folder.fd)
        return _local_etag(st)  # a rename keeps the inode and its times

    def download_file(self, key: str, path: Path, size: int | None = None) -> str:
        source = self._path(key)
        fd = self.tree.open_file(key)
        if fd is None:
            raise RegistryError(f"{source}: object not found")
        with os.fdopen(fd, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if size is not None and actual != size:
                raise SizeMismatch(f"{source}: {actual} bytes, the manifest says {size}")
            digest, copied = copy_stream_hashing(f, path, limit=size)
        if size is not None and copied != size:
            raise SizeMismatch(f"{source}: changed while it was read ({copied} bytes, the manifest says {size})")
        return digest

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = split(prefix.rsplit("/", 1)[0]) if "/" in prefix else []
        out = []
        for key, st in self.tree.walk(base, skip_top=frozenset({self.LOCKS}) if not base else frozenset()):
            name = key.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a write in progress
            if key.startswith(prefix):
                when = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)
                out.append(ObjectInfo(key, st.st_size, when, _local_etag(st)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: builtins.list[str]) -> None:
        for key in keys:
            self.tree.remove(key)


def _unlink_at(folder: Folder, name: str) -> None:
    try:
        os.unlink(name, dir_fd=folder.fd)
    except FileNotFoundError:
        pass


def _local_etag(st: os.stat_result) -> str:
    """A local file's identity: it changes when the file is replaced or rewritten."""
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"


class _FileLock:
    """An exclusive `flock` on `folder/name` under the registry root (opened without following links)."""

    def __init__(self, storage: LocalStorage, folder: str, name: str):
        self.storage, self.folder, self.name = storage, folder, name

    def __enter__(self):
        with self.storage.tree.folder([self.folder], create=True) as folder:
            assert folder is not None
            fd = self.storage.tree.open_at(folder, self.name, os.O_RDONLY | os.O_CREAT)
        if fd is None:
            raise RegistryError(f"{self.storage.root / self.folder / self.name}: a folder where a lock file belongs")
        self.fd = fd
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:  # ENOLCK, EOPNOTSUPP: some network and FUSE mounts
            os.close(self.fd)
            raise RegistryError(
                f"{self.storage.root}: the filesystem does not support file locks "
                f"(flock(2): {os.strerror(err.errno or 0)}); the local registry needs them "
                "for alias compare-and-swap"
            ) from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
