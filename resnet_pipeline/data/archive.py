"""Extraction of dataset archives (tar of any compression, zip) that no member can trick.

Every member is vetted before anything is written: names must be relative and stay inside the
destination, links (symbolic or hard) and device files are refused, a name that is a file for one
member and a folder for another (named, or implied by a path through it) is refused in either
order, and the member count, the total size and the compression ratio are bounded. The members are
then written by this module, not by `tarfile.extractall`: folders with `mkdir` (an existing
non-folder in the way is refused), files with `O_CREAT | O_EXCL | O_NOFOLLOW`, streamed and counted
as they are decompressed. No link is ever created, so the "delayed link" trick (a link that looks
harmless when checked and passes through components added later as links `p0 -> .`) has nothing to
work with, and safety does not rest on the `tarfile` filters of the running Python (bypassable
before 3.11.13, see the README). Files get the permissions the umask asks for; member modes and
owners are ignored.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
LINK_PREVIEW = 1024  # bytes of a zip link's target read to name it in the error
MAX_HEADER = 1 << 16  # largest GNU long-name / pax header accepted (tarfile reads them whole)


class UnsafeArchiveError(ValueError):
    """An archive member would escape the destination, is a link or device, or a limit is exceeded."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an archive may unpack to (params: download.max_members, max_extract_gb, max_ratio)."""

    max_members: int = 1_000_000
    max_bytes: int = 200 * 2**30
    max_ratio: float = 100.0


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # file, dir, sym, hard, dev
    size: int
    compressed: int | None  # zip only
    handle: object


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized GNU long-name and pax headers before tarfile reads them into memory."""

    def _proc_member(self, tar):  # noqa: ANN001 - tarfile's own hook
        long_types = (
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
        )
        if self.type in long_types and self.size > MAX_HEADER:
            raise UnsafeArchiveError(
                f"{tar.name}: a name or pax header of {self.size} bytes, above the {MAX_HEADER} accepted"
            )
        return super()._proc_member(tar)


def _absolute(name: str) -> bool:
    """POSIX-absolute, leading backslash, or a Windows drive (`C:`)."""
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha())


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _refuse(archive: Path, name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: unsafe member {name!r}: {why}")


def _limit(archive: Path, what: str, value: float, key: str, limit: float) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive}: {what} {value:g} exceeds {key} = {limit:g}; raise {key} in params.yaml if the archive is trusted"
    )


def _tar_members(archive: Path, tar: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[_Member]:
    count = 0
    for m in tar:  # lazily: a count bomb stops at the limit, not after reading every header
        count += 1
        if count > limits.max_members:
            raise _limit(archive, "member count above", limits.max_members, "download.max_members", limits.max_members)
        kind = "sym" if m.issym() else "hard" if m.islnk() else "dir" if m.isdir() else "file" if m.isreg() else "dev"
        yield _Member(m.name, kind, m.size if kind == "file" else 0, None, m)


def _zip_count(archive: Path) -> int:
    """The member count of the end-of-central-directory record, read before the directory is."""
    with open(archive, "rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the record zipfile itself trusts
    if not end:
        raise ValueError(f"{archive}: not a tar or zip archive")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "sym"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "dev"
    return "dir" if info.is_dir() else "file"


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        if info.flag_bits & 0x1:
            raise _refuse(archive, info.filename, "encrypted (no password is ever given)")
        kind = _zip_kind(info)
        yield _Member(info.filename, kind, info.file_size if kind == "file" else 0, info.compress_size, info)


def _link_target(zf: zipfile.ZipFile | None, member: _Member) -> str:
    if zf is None:
        return member.handle.linkname  # type: ignore[attr-defined]
    with zf.open(member.handle) as f:  # type: ignore[arg-type]
        head = f.read(LINK_PREVIEW + 1)
    text = head[:LINK_PREVIEW].decode("utf-8", "replace")
    return text + ("..." if len(head) > LINK_PREVIEW else "")


def _claim(archive: Path, seen: dict[str, tuple[str, str]], name: str, parts: list[str], kind: str) -> None:
    """Record `name` and the folders its path implies in `seen`; refuse a name that one member makes
    a file and another a folder (by a folder member or a path through it), in either order."""
    for i in range(1, len(parts)):
        folder = "/".join(parts[:i])
        was, by = seen.setdefault(folder, ("dir", name))
        if was == "file":
            raise _refuse(archive, name, f"inside {folder!r}, which is a file (member {by!r}), not a folder")
    key = "/".join(parts)
    if key not in seen:
        seen[key] = (kind, name)
        return
    was, by = seen[key]
    if kind == "file" and was == "file":
        raise _refuse(archive, name, "appears twice")
    if kind == "file":
        raise _refuse(archive, name, f"a file, but member {by!r} makes {key!r} a folder")
    if was == "file":
        raise _refuse(archive, name, f"a folder, but member {by!r} before it is a file of that name")


def _vet(archive: Path, members: list[_Member], limits: ArchiveLimits, zf: zipfile.ZipFile | None) -> int:
    """Refuse the archive unless every member is safe and within the limits; return the byte cap."""
    cap = min(limits.max_bytes, int(limits.max_ratio * max(archive.stat().st_size, 1)))
    seen: dict[str, tuple[str, str]] = {}  # normalised name -> (file or dir, the member that made it so)
    total = 0
    for m in members:
        if _absolute(m.name):
            raise _refuse(archive, m.name, "absolute path")
        parts = _parts(m.name)
        if ".." in parts:
            raise _refuse(archive, m.name, "'..' component")
        if m.kind == "sym":
            raise _refuse(archive, m.name, f"symbolic link (to {_link_target(zf, m)!r}); links are not extracted")
        if m.kind == "hard":
            raise _refuse(archive, m.name, f"hard link (to {_link_target(zf, m)!r}); links are not extracted")
        if m.kind == "dev":
            raise _refuse(archive, m.name, "device file, FIFO or socket")
        if not parts:
            if m.kind == "dir":
                continue
            raise _refuse(archive, m.name, "empty name")
        _claim(archive, seen, m.name, parts, m.kind)
        if m.compressed is not None and m.size > limits.max_ratio * max(m.compressed, 1):
            raise _limit(
                archive,
                f"member {m.name!r} compression ratio",
                m.size / max(m.compressed, 1),
                "download.max_ratio",
                limits.max_ratio,
            )
        total += m.size
    if total > limits.max_bytes:
        raise _limit(archive, "total size in bytes", total, "download.max_extract_gb", limits.max_bytes / 2**30)
    if total > cap:
        raise _limit(
            archive,
            "compression ratio (unpacked / archive bytes)",
            total / max(archive.stat().st_size, 1),
            "download.max_ratio",
            limits.max_ratio,
        )
    return cap


def _make_dirs(dest: Path, parts: list[str]) -> Path:
    """dest/parts..., creating folders one by one; anything but a real folder in the way is refused."""
    here = dest
    for part in parts:
        here = here / part
        try:
            os.mkdir(here)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                raise UnsafeArchiveError(f"{here}: expected a folder, found something else") from None
    return here


def _write(archive: Path, dest: Path, m: _Member, source: IO[bytes], budget: list[int]) -> None:
    parts = _parts(m.name)
    folder = _make_dirs(dest, parts[:-1])
    target = folder / parts[-1]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while block := source.read(CHUNK):
            written += len(block)
            budget[0] -= len(block)
            if written > m.size:
                raise UnsafeArchiveError(
                    f"{archive}: member {m.name!r} unpacks to more than the {m.size} bytes its header declares"
                )
            if budget[0] < 0:
                raise UnsafeArchiveError(
                    f"{archive}: members unpack to more than the cap of download.max_extract_gb "
                    "and download.max_ratio x the archive's size"
                )
            out.write(block)


def _extract(archive: Path, dest: Path, members: list[_Member], cap: int, open_member: Callable) -> None:
    budget = [cap]
    for m in members:
        if m.kind == "dir":
            _make_dirs(dest, _parts(m.name))
        else:
            with open_member(m) as source:
                _write(archive, dest, m, source, budget)


def check_tree(dest: Path) -> None:
    """Refuse a tree that holds anything but folders and regular files (the end state promised)."""
    for folder, dirs, files in os.walk(dest):
        for name in dirs + files:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafeArchiveError(f"{os.path.join(folder, name)}: not a folder or regular file after extraction")


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    *,
    select: Callable[[str], bool] | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> list[str]:
    """Extract a .tar / .tar.gz / .tgz / .zip (detected by content, not name) into dest; return the
    names of the members extracted. Every member is vetted (even those `select` skips) before
    anything is written."""
    archive, dest = Path(archive), Path(dest)
    keep = select or (lambda name: True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, tarinfo=_BoundedTarInfo) as tar:
            members = list(_tar_members(archive, tar, limits))
            cap = _vet(archive, members, limits, None)
            chosen = [m for m in members if keep(m.name)]
            dest.mkdir(parents=True, exist_ok=True)
            _extract(archive, dest, chosen, cap, lambda m: tar.extractfile(m.handle))
    elif zipfile.is_zipfile(archive):
        count = _zip_count(archive)
        if count > limits.max_members:
            raise _limit(archive, "member count", count, "download.max_members", limits.max_members)
        with zipfile.ZipFile(archive) as zf:
            members = list(_zip_members(archive, zf))
            cap = _vet(archive, members, limits, zf)
            chosen = [m for m in members if keep(m.name)]
            dest.mkdir(parents=True, exist_ok=True)
            _extract(archive, dest, chosen, cap, lambda m: zf.open(m.handle))
    else:
        raise ValueError(f"{archive}: not a tar or zip archive")
    check_tree(dest)
    logger.info("extracted %d members of %s into %s", len(chosen), archive, dest)
    return [m.name for m in chosen]
