"""Small file helpers shared by the stages: hashing, atomic writes and folder replacement.

Everything written here is fsynced (files, then the folders that name them) and gets the
permissions the umask asks for, as `open()` would give: never the 0600/0700 of `mkstemp`/`mkdtemp`.
A folder is replaced so that its old or its new content is always at its name: an atomic exchange
(`renameat2(RENAME_EXCHANGE)`) where the file system has one, else old aside, new in, then delete,
with the old one put back by `recover_dir` if a kill fell between the two renames. A destination
that is a symbolic link (`data/shards` on a bigger disk) is replaced in the folder it points to, and
the link is kept.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks; `algorithm` is one of hashlib's ("sha256", "md5")."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link to (or a copy of) the file `src` names, following links: dst is a regular file."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(src), dst)  # Linux link() would link the link itself
    except OSError:
        shutil.copyfile(src, dst)


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file, refusing a link at its last component (O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return f.read()


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make the names in a folder durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SYNCFS_ABOVE = 64  # files: above this, one syncfs() of the file system beats an fsync per file


def _syncfs(path: str | Path) -> bool:
    """Flush the whole file system holding `path` (Linux syncfs); False where there is none."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def fsync_tree(root: str | Path) -> None:
    """Make every file and folder under `root` durable (links not followed): an fsync per file, then
    per folder, deepest first; for a large tree one syncfs() of its file system (160,000 small fresh
    files: one journal commit instead of 160,000)."""
    walk = list(os.walk(root, topdown=False))
    files = [os.path.join(folder, name) for folder, _dirs, names in walk for name in names]
    if len(files) > SYNCFS_ABOVE and _syncfs(root):
        return
    for path in files:
        if os.path.islink(path):
            continue
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder, _dirs, _names in walk:
        fsync_dir(folder)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that writes it first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None


def _final(dest: Path) -> Path:
    """Where a replacement of `dest` happens: `dest` itself, or the folder a link at `dest` points
    to, so that staging, swap and aside copy live on the link's disk and the link stays."""
    if not os.path.islink(dest):
        return dest
    real = Path(os.path.realpath(dest))
    if not real.parent.is_dir():
        raise FileNotFoundError(
            f"{dest}: a symbolic link to {real}, whose folder {real.parent} does not exist; "
            "mount the disk or make the folder, or remove the link"
        )
    if os.path.lexists(real) and not stat.S_ISDIR(os.lstat(real).st_mode):
        raise NotADirectoryError(f"{dest}: a symbolic link to {real}, which is not a folder; expected a folder")
    return real


def _aside(dest: Path) -> Path:
    """Where the old `dest` waits while the fallback replacement renames the new one in."""
    return dest.with_name(f".{dest.name}.old")


def recover_dir(dest: str | Path) -> None:
    """Finish a replacement a kill interrupted: put the old folder back if `dest` is missing,
    drop it if the new one is in place."""
    dest = _final(Path(dest))
    aside = _aside(dest)
    if not os.path.lexists(aside):
        return
    if os.path.lexists(dest):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(aside, dest)
        fsync_dir(dest.parent)


def new_staging_dir(dest: str | Path) -> Path:
    """An empty hidden folder beside `dest` (beside its target if `dest` is a link), to build its
    replacement in (mode per the umask)."""
    dest = _final(Path(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _step(name: str) -> None:
    """A point between two steps of a replacement; tests stop the process here (see tests/data)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None or os.environ.get("RESNET_PIPELINE_NO_EXCHANGE"):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: str | Path, dest: str | Path) -> None:
    """Put a completed staging folder in the place of `dest`: at every moment `dest` (or, between
    the two renames of the fallback, its aside copy that `recover_dir` restores) holds old or new."""
    staging, dest = Path(staging), _final(Path(dest))
    fsync_tree(staging)
    _step("synced")
    if not os.path.lexists(dest):
        os.rename(staging, dest)
        _step("renamed")
        fsync_dir(dest.parent)
        return
    if _exchange(staging, dest):
        _step("exchanged")
        fsync_dir(dest.parent)
        _step("exchange-synced")
        shutil.rmtree(staging)  # now the old content
        return
    aside = _aside(dest)
    if os.path.lexists(aside):
        shutil.rmtree(aside)
    os.rename(dest, aside)
    _step("aside")
    os.rename(staging, dest)
    _step("renamed")
    fsync_dir(dest.parent)
    _step("renamed-synced")
    shutil.rmtree(aside)


@contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `dest`; when the block succeeds it replaces `dest` as a whole.

    If the block fails, the staged folder is removed and `dest` is left as it was.
    """
    tmp = new_staging_dir(dest)
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
