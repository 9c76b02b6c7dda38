"""Paths under a local registry folder, opened without following links: regular files and folders only.

Whoever can write a registry folder can plant a symbolic link at any part of a path (a linked
`models/<name>/versions` would lead gc into someone's photos, a linked `versions/<N>` would take a
registration's files elsewhere) or a special file (a reader opening a FIFO blocks forever). So a
path under the root is never handed to the kernel whole: it is walked one part at a time, each
folder opened from the descriptor of the one above it with `O_NOFOLLOW | O_DIRECTORY`, and a file
with `O_NOFOLLOW | O_NONBLOCK`, then checked with `fstat`. A part that is a link, or a file that is
not regular, is refused with a `RegistryError` naming it. Every operation (create, rename, link,
unlink, rmdir) then goes through the descriptor of its own folder, so a part swapped for a link
after it was checked redirects nothing.

The root itself is the user's choice and may be a link. Files are created 0666 and folders 0777,
less the umask, as `open()` and `mkdir()` make them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from resnet_pipeline.registry.errors import RegistryError

REFUSAL = "a registry folder holds regular files and folders only"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
FILE_FLAGS = _NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC  # never blocks on a FIFO
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
)


def kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), f"a file of type {stat.S_IFMT(mode):o}")


def refused(path: Path, mode: int) -> RegistryError:
    return RegistryError(f"{path}: {kind(mode)}; {REFUSAL}")


@dataclass
class Folder:
    """An open folder under the root: `fds[i]` is the folder holding `parts[i]`, `fd` the folder itself."""

    path: Path
    parts: list[str]
    fds: list[int] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.fds[-1]


def split(key: str) -> list[str]:
    """A key's parts, refused if one could lead anywhere but down (empty, '.', '..')."""
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RegistryError(f"registry key {key!r}: has an empty, '.' or '..' part")
    return parts


def _mode_at(dir_fd: int, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def open_dir_at(dir_fd: int, name: str, path: Path, *, create: bool) -> int | None:
    """The folder `name` in `dir_fd` (made if `create`), None if it is absent (or a regular file, which
    holds no objects); a link or special file there is refused."""
    for _ in range(3):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o777, dir_fd=dir_fd)
            except FileExistsError:
                pass
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise
            mode = _mode_at(dir_fd, name)
            if mode is None or stat.S_ISDIR(mode):
                continue  # changed under us: look again
            if stat.S_ISREG(mode):
                if not create:
                    return None
                raise RegistryError(f"{path}: a regular file where the registry needs a folder") from None
            raise refused(path, mode) from None
    raise RegistryError(f"{path}: keeps changing while it is opened")


class Tree:
    """The folder `root`, read and written one part at a time; see the module docstring."""

    def __init__(self, root: Path):
        self.root = root

    @contextmanager
    def folder(self, parts: list[str], *, create: bool) -> Iterator[Folder | None]:
        """The folder `root/parts...` (made if `create`), or None if it does not exist."""
        if create:
            os.makedirs(self.root, exist_ok=True)
        folder = Folder(self.root, [])
        try:
            try:
                folder.fds.append(os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC))
            except (FileNotFoundError, NotADirectoryError):
                yield None
                return
            for part in parts:
                path = folder.path / part
                fd = open_dir_at(folder.fd, part, path, create=create)
                if fd is None:
                    yield None
                    return
                folder.fds.append(fd)
                folder.parts.append(part)
                folder.path = path
            yield folder
        finally:
            for fd in folder.fds:
                os.close(fd)

    def open_at(self, folder: Folder, name: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int | None:
        """A descriptor of the regular file `name` in `folder`, None if there is none (or a folder is
        there); a link or special file is refused, and opening one never blocks."""
        path = folder.path / name
        try:
            fd = os.open(name, flags | FILE_FLAGS, mode, dir_fd=folder.fd)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EMLINK, errno.ENXIO):
                raise
            found = _mode_at(folder.fd, name)
            if found is None:
                return None
            raise refused(path, found) from None
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            os.close(fd)
            if stat.S_ISDIR(st_mode):
                return None
            raise refused(path, st_mode)
        return fd

    def open_file(self, key: str) -> int | None:
        """A descriptor of the regular file `key`, for reading; None if it does not exist."""
        *parent, name = split(key)
        with self.folder(parent, create=False) as folder:
            return None if folder is None else self.open_at(folder, name)

    def lstat(self, key: str) -> os.stat_result | None:
        """The file `key` (not followed), None if absent or a folder; a link or special file is refused."""
        *parent, name = split(key)
        with self.folder(parent, create=False) as folder:
            if folder is None:
                return None
            try:
                st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISDIR(st.st_mode):
                return None
            if not stat.S_ISREG(st.st_mode):
                raise refused(folder.path / name, st.st_mode)
            return st

    def walk(self, parts: list[str], skip_top: frozenset[str] = frozenset()) -> Iterator[tuple[str, os.stat_result]]:
        """(key, stat) of every regular file under `root/parts...`; a link or special file anywhere
        below is refused, naming it. Names in `skip_top` are left out at the first level."""
        with self.folder(parts, create=False) as folder:
            if folder is not None:
                yield from self._walk(folder.fd, folder.path, "/".join(parts), skip_top)

    def _walk(self, fd: int, path: Path, prefix: str, skip: frozenset[str]) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(fd) as entries:
            names = sorted(e.name for e in entries if e.name not in skip)
        for name in names:
            key = f"{prefix}/{name}" if prefix else name
            mode = _mode_at(fd, name)
            if mode is None:
                continue  # removed meanwhile
            if stat.S_ISDIR(mode):
                sub = open_dir_at(fd, name, path / name, create=False)
                if sub is None:
                    continue
                try:
                    yield from self._walk(sub, path / name, key, frozenset())
                finally:
                    os.close(sub)
            elif stat.S_ISREG(mode):
                try:
                    yield key, os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
            else:
                raise refused(path / name, mode)

    def remove(self, key: str) -> None:
        """Unlink the file `key` (a link there is removed, never followed), then every folder above it
        that it leaves empty, up to the root."""
        *parent, name = split(key)
        with self.folder(parent, create=False) as folder:
            if folder is None:
                return
            try:
                os.unlink(name, dir_fd=folder.fd)
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError) as err:
                raise RegistryError(f"{folder.path / name}: cannot delete it ({err.strerror})") from None
            for depth in range(len(folder.parts) - 1, -1, -1):
                try:
                    os.rmdir(folder.parts[depth], dir_fd=folder.fds[depth])
                except FileNotFoundError:
                    continue
                except OSError:  # not empty (or no longer a folder): the folders above are not empty either
                    break


def fsync_fd(fd: int) -> None:
    """Flush a file or folder; a no-op where the filesystem does not support it for folders."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
