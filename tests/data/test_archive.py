"""The archive tricks of issue 15, each refused before anything is written or read from outside.

Archives are built with the standard library's own writers, as an attacker would.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from resnet_pipeline.data.archive import ArchiveLimits, UnsafeArchiveError, safe_extract

SECRET = b"the file outside the data folder"


def _tar(path: Path, entries: list[tuple[str, bytes | str]], mode: str = "w", fmt: int = tarfile.GNU_FORMAT) -> Path:
    """entries: (name, bytes) for a file, (name, str) for a symlink to that target."""
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def _zip(path: Path, entries: list[tuple[str, bytes | str]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if isinstance(content, str):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                content = content.encode()
            zf.writestr(info, content)
    return path


def _nothing_written(dest: Path) -> None:
    assert not dest.exists() or not any(dest.rglob("*"))


def _delayed_link(tmp_path: Path) -> list[tuple[str, bytes | str]]:
    """`l` looks inside (p0/../secret lexically is `secret`), until `p0 -> .` is added after it:
    then dest/p0/.. is dest's parent, where the secret is."""
    (tmp_path / "secret").write_bytes(SECRET)
    return [("images/a/one.png", b"png"), ("l", "p0/../secret"), ("p0", ".")]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_delayed_link_is_refused_and_nothing_outside_is_read(tmp_path, kind):
    entries = _delayed_link(tmp_path)
    archive = (_tar if kind == "tar" else _zip)(tmp_path / f"a.{kind}", entries)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, dest)
    assert str(archive) in str(err.value) and "'l'" in str(err.value) and "symbolic link" in str(err.value)
    _nothing_written(dest)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_link_whose_components_come_later_as_links_is_refused(tmp_path, kind):
    # the chain of the issue: p0 -> ., p1 -> ., ... added after the link that passes through them
    (tmp_path / "secret").write_bytes(SECRET)
    entries: list[tuple[str, bytes | str]] = [("x/leak", "p0/p1/p2/../../../../secret")]
    entries += [("/".join(["x"] + [f"p{j}" for j in range(i + 1)]), ".") for i in range(3)]
    archive = (_tar if kind == "tar" else _zip)(tmp_path / f"a.{kind}", entries)
    with pytest.raises(UnsafeArchiveError, match="'x/leak'.*symbolic link"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_zip_link_bomb_target_is_read_with_a_small_bound(tmp_path):
    """A zip symlink whose 'target' inflates to 64 MB: refused after reading about 1 KB of it,
    even with the ratio limit lifted (tracemalloc measures what Python allocated meanwhile)."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("a/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as f:
            for _ in range(64):
                f.write(b"A" * 2**20)
    assert archive.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchiveError, match="'a/link': symbolic link") as err:
            safe_extract(archive, tmp_path / "out", limits=ArchiveLimits(max_ratio=1e9))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    assert len(str(err.value)) < 1300
    _nothing_written(tmp_path / "out")


def test_tar_member_count_bomb_stops_at_the_limit(tmp_path):
    archive = _tar(tmp_path / "many.tar.gz", [(f"d/{i}", b"") for i in range(1200)], "w:gz")
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out", limits=ArchiveLimits(max_members=1000))
    message = str(err.value)
    assert str(archive) in message and "download.max_members = 1000" in message and "member count" in message
    _nothing_written(tmp_path / "out")


def test_zip_member_count_bomb_refused_from_the_end_record(tmp_path):
    archive = _zip(tmp_path / "many.zip", [(f"d/{i}", b"") for i in range(1200)])
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out", limits=ArchiveLimits(max_members=1000))
    assert "member count 1200 exceeds download.max_members = 1000" in str(err.value)
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_total_size_limit_names_archive_limit_and_value(tmp_path, kind):
    entries = [("a/1.bin", bytes(range(256)) * 8), ("a/2.bin", bytes(range(256)) * 8)]
    archive = _tar(tmp_path / "a.tar", entries) if kind == "tar" else _zip(tmp_path / "a.zip", entries)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out", limits=ArchiveLimits(max_bytes=3000))
    assert str(archive) in str(err.value) and "total size in bytes 4096" in str(err.value)
    assert "download.max_extract_gb" in str(err.value)
    _nothing_written(tmp_path / "out")


def test_tar_gz_ratio_bomb_is_refused(tmp_path):
    archive = _tar(tmp_path / "zeros.tar.gz", [("a/zeros.bin", bytes(8 * 2**20))], "w:gz")
    with pytest.raises(UnsafeArchiveError, match=r"compression ratio .* exceeds download.max_ratio = 100"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_zip_member_ratio_bomb_is_refused(tmp_path):
    archive = _zip(tmp_path / "zeros.zip", [("a/ok.txt", b"fine"), ("a/zeros.bin", bytes(4 * 2**20))])
    with pytest.raises(UnsafeArchiveError, match=r"member 'a/zeros.bin' compression ratio .* download.max_ratio"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path / "out")


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path):
    archive = _tar(tmp_path / "pax.tar", [("a/" + "n" * 70_000, b"x")], fmt=tarfile.PAX_FORMAT)
    with pytest.raises(UnsafeArchiveError, match="header of .* bytes"):
        safe_extract(archive, tmp_path / "out")


def test_duplicate_member_and_file_used_as_folder_are_refused(tmp_path):
    archive = _tar(tmp_path / "dup.tar", [("a/x", b"1"), ("a/x", b"2")])
    with pytest.raises(UnsafeArchiveError, match="'a/x': appears twice"):
        safe_extract(archive, tmp_path / "out")
    archive = _zip(tmp_path / "nest.zip", [("a/x", b"1"), ("a/x/y", b"2")])
    with pytest.raises(UnsafeArchiveError, match="'a/x/y': inside 'a/x', which is a file"):
        safe_extract(archive, tmp_path / "out")


def test_extracted_files_are_regular_with_umask_modes(tmp_path):
    import os

    archive = _tar(tmp_path / "ok.tar.gz", [("top/a/1.txt", b"1"), ("top/b/2.txt", b"22")], "w:gz")
    old = os.umask(0o022)
    try:
        names = safe_extract(archive, tmp_path / "out")
    finally:
        os.umask(old)
    assert names == ["top/a/1.txt", "top/b/2.txt"]
    assert (tmp_path / "out/top/b/2.txt").read_bytes() == b"22"
    assert stat.S_IMODE((tmp_path / "out/top/a/1.txt").stat().st_mode) == 0o644
    assert gzip.decompress(archive.read_bytes())[:3]  # a real gzip stream


def test_encrypted_zip_member_is_refused_by_name(tmp_path):
    archive = tmp_path / "locked.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/secret.png", b"not really encrypted")
    data = bytearray(archive.read_bytes())  # set the encryption flag, as a password-protected zip has it
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + offset] |= 0x1
    archive.write_bytes(bytes(data))
    with pytest.raises(UnsafeArchiveError, match="'a/secret.png': encrypted"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize(
    "entries, member, other",
    [
        ([("cls/a", b"file"), ("cls/a/b.png", b"png")], "cls/a/b.png", "cls/a"),
        ([("cls/a/b.png", b"png"), ("cls/a", b"file")], "cls/a", "cls/a/b.png"),
        ([("cls/a/deep/b.png", b"png"), ("x.png", b"x"), ("cls/a", b"file")], "cls/a", "cls/a/deep/b.png"),
    ],
    ids=["file-then-inside", "inside-then-file", "deep-inside-then-file"],
)
def test_a_file_that_is_also_an_implied_folder_is_refused_before_extraction(tmp_path, kind, entries, member, other):
    """Issue 30: `cls/a/b.png` then a file `cls/a` passed the check and failed mid-extraction with a
    raw FileExistsError; either order is refused up front, naming both members."""
    archive = (_tar if kind == "tar" else _zip)(tmp_path / f"clash.{kind}", entries)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out")
    message = str(err.value)
    assert f"unsafe member {member!r}" in message and repr(other) in message, message
    assert "file" in message and "folder" in message, message
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("folder_first", [True, False], ids=["folder-first", "file-first"])
def test_a_folder_member_and_a_file_of_the_same_name_are_refused(tmp_path, kind, folder_first):
    entries = [("cls/a/", None), ("cls/a", b"file")]
    if not folder_first:
        entries.reverse()
    archive = tmp_path / f"clash.{kind}"
    if kind == "tar":
        with tarfile.open(archive, "w") as tar:
            for name, content in entries:
                info = tarfile.TarInfo(name)
                if content is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            for name, content in entries:
                zf.writestr(name, content or b"")
    second = "a file" if folder_first else "a folder"  # tarfile drops a folder name's trailing /
    with pytest.raises(UnsafeArchiveError, match=rf"unsafe member 'cls/a/?': {second}, but member 'cls/a/?' "):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path / "out")
