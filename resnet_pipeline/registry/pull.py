"""Bringing a version's files onto this machine without letting its manifest choose where they go.

The manifest is checked as a whole first (`manifest.check_files`): one bad name refuses the version
before anything is written. Files then come down into a folder this process made, each to a
temporary name at the folder's top, and take their final name only once their size and sha256
match the manifest's; folders are made one part at a time and an existing part that is a symlink
is refused, so no name can lead out of the folder.

A temporary name (`part_name`) holds a backslash, which `manifest.check_file_name` refuses in any
listed name: no file of a version can have it, or lie beneath it, so a download never overwrites a
file already in place (a version listing `.part-1` and `b` gets both). Before the pull reports
success, every listed file is checked to be in place, a regular file of its size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from resnet_pipeline.registry.manifest import MANIFEST, check_files, inside
from resnet_pipeline.registry.storage import RegistryError, SizeMismatch, Storage


def part_name(index: int) -> str:
    """The temporary name of the `index`-th file of a pull: a name no manifest can list."""
    return f".part\\{index}"


def _make_parents(folder: Path, name: str, what: str) -> None:
    """Create the folders of `name` under `folder`, refusing any part that exists and is not a real folder."""
    current = folder
    for part in name.split("/")[:-1]:
        current = current / part
        try:
            os.mkdir(current)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise RegistryError(
                    f"{what}: file {name!r}: {current} exists and is not a folder made by "
                    "this pull (a symlink?); refusing to write through it"
                ) from None


def download_version(
    storage: Storage, key_of: Callable[[str], str], what: str, manifest: dict, folder: Path, manifest_bytes: bytes
) -> None:
    """Download every file of `manifest` into `folder` (a new folder of this process), verify each, and
    write `manifest_bytes` as its manifest.json. `what` names the version in errors."""
    files = check_files(manifest.get("files"), f"{what}: manifest")
    for index, (name, entry) in enumerate(sorted(files.items())):
        inside(folder, name)
        part = folder / part_name(index)
        try:
            actual = storage.download_file(key_of(name), part, size=entry["bytes"])
        except SizeMismatch as err:
            raise RegistryError(f"{what}: file {name} fails verification: {err}; refusing it") from None
        except RegistryError as err:
            raise RegistryError(f"{what}: file {name} listed in the manifest cannot be read: {err}") from None
        if actual != entry["sha256"]:
            raise RegistryError(
                f"{what}: file {name} fails verification: sha256 {actual}, manifest says {entry['sha256']}; refusing it"
            )
        if part.stat().st_size != entry["bytes"]:
            raise RegistryError(
                f"{what}: file {name} fails verification: {part.stat().st_size} bytes, manifest "
                f"says {entry['bytes']}; refusing it"
            )
        _make_parents(folder, name, what)
        final = inside(folder, name)  # again, now that its folders exist
        os.rename(part, final)  # rename(2) replaces a name, it never follows a symlink there
    for name, entry in files.items():
        st = os.lstat(folder / name)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
            raise RegistryError(f"{what}: file {name} is not in place after the pull; refusing the version")
    (folder / MANIFEST).write_bytes(manifest_bytes)


def complete(folder: Path, manifest: dict, manifest_bytes: bytes, sha256_file: Callable[[Path], str]) -> bool:
    """Does `folder` (a real folder, no symlinks inside) hold exactly this manifest and its files?"""
    try:
        if folder.is_symlink() or not folder.is_dir() or (folder / MANIFEST).read_bytes() != manifest_bytes:
            return False
        for name, entry in check_files(manifest.get("files"), "manifest").items():
            path = inside(folder, name)
            if path.is_symlink() or not path.is_file() or path.stat().st_size != entry["bytes"]:
                return False
            if sha256_file(path) != entry["sha256"]:
                return False
        return True
    except (OSError, ValueError, RegistryError):
        return False
