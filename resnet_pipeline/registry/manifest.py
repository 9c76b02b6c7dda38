"""A version's manifest, checked before anything it names touches the disk.

Whoever can write the bucket writes the manifests too, so a manifest is input from a stranger: its
sha256s prove only that the files are the ones *it* lists. Every file name must be a relative POSIX
path (no absolute name, no empty, `.` or `..` part, no backslash, no NUL or other control
character, no name that is also the folder of another); every entry needs a sha256 of 64 hex digits
and a size. A manifest that breaks any rule is refused as a whole, naming the name.
"""

from __future__ import annotations

import re
from pathlib import Path

from resnet_pipeline.registry.storage import RegistryError

MANIFEST = "manifest.json"
CLAIM = "_claim.json"
HEARTBEAT = "_heartbeat.json"
RESERVED = (MANIFEST, CLAIM, HEARTBEAT)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest larger than this is refused before it is parsed
MAX_FILES = 100_000
MAX_NAME = 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_file_name(name: object, what: str) -> str:
    """`name` if it is a safe relative POSIX path inside a version, else a RegistryError naming it."""

    def bad(why: str) -> RegistryError:
        return RegistryError(
            f"{what}: file name {name!r} {why}; expected a relative path of '/'-separated "
            "parts, none of them empty, '.' or '..'"
        )

    if not isinstance(name, str) or not name:
        raise bad("is not a non-empty string")
    if len(name) > MAX_NAME:
        raise bad(f"is longer than {MAX_NAME} characters")
    if "\\" in name:
        raise bad("contains a backslash")
    if _CONTROL.search(name):
        raise bad("contains a NUL or control character")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise bad("is absolute")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("has an empty, '.' or '..' part")
    if parts[0] in RESERVED:
        raise bad("is reserved by the registry")
    return name


def check_files(files: object, what: str) -> dict[str, dict]:
    """The `files` table of a manifest, every entry checked: {name: {"sha256": hex, "bytes": int}}."""
    if not isinstance(files, dict):
        raise RegistryError(f"{what}: 'files' is {type(files).__name__}, expected a table of name -> sha256 and bytes")
    if len(files) > MAX_FILES:
        raise RegistryError(f"{what}: lists {len(files)} files; at most {MAX_FILES} are allowed")
    checked: dict[str, dict] = {}
    for name, entry in files.items():
        check_file_name(name, what)
        if not isinstance(entry, dict):
            raise RegistryError(f"{what}: file {name!r}: entry is {type(entry).__name__}, expected sha256 and bytes")
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise RegistryError(f"{what}: file {name!r}: sha256 {digest!r} is not 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RegistryError(f"{what}: file {name!r}: bytes {size!r} is not a non-negative integer")
        checked[name] = {"sha256": digest, "bytes": size}
    folders = {"/".join(n.split("/")[:i]) for n in checked for i in range(1, n.count("/") + 1)}
    clash = sorted(folders & set(checked))
    if clash:
        raise RegistryError(f"{what}: file name {clash[0]!r} is both a file and the folder of another file")
    return checked


def check_manifest(manifest: object, what: str, *, name: str | None = None, version: int | None = None) -> dict:
    """A parsed manifest, checked (files, and the name and version it claims to be)."""
    if not isinstance(manifest, dict):
        raise RegistryError(f"{what}: not a JSON object")
    if name is not None and manifest.get("name") != name:
        raise RegistryError(f"{what}: names model {manifest.get('name')!r}, expected {name!r}")
    if version is not None and manifest.get("version") != version:
        raise RegistryError(f"{what}: names version {manifest.get('version')!r}, expected {version}")
    check_files(manifest.get("files"), what)
    return manifest


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused unless it resolves (symlinks followed) inside `folder`."""
    root = folder.resolve()
    path = (folder / name).resolve()
    if path != root and root not in path.parents:
        raise RegistryError(f"{folder}: file name {name!r} resolves to {path}, outside the destination; refusing it")
    return folder / name
