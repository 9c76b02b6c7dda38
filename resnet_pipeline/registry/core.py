"""Versions, aliases, pulls and garbage collection, the same over every storage backend.

    models/<name>/versions/<N>/{_claim.json, model.keras, saved_model/..., params.yaml, metrics.json,
                                labels.json, manifest.json}
    models/<name>/aliases/<alias>.json
    models/<name>/aliases/<alias>.history/<timestamp>-<uuid>.json

A version number is claimed by creating `_claim.json` in its folder only if it does not exist;
a writer that loses takes the next number. The files go up next and `manifest.json` (sha256 and
size of every file, and the metadata) last: it is the commit point, and a version without it is
invisible. An alias is replaced by compare-and-swap on its ETag; every attempt, won or lost, is
recorded as its own history object.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from resnet_pipeline.fileio import sha256_file
from resnet_pipeline.registry.spec import Spec, check_alias, check_name, parse_spec
from resnet_pipeline.registry.storage import Conflict, RegistryError, Storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLAIM = "_claim.json"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def whoami() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class AliasState:
    """An alias as read: its record (None if it does not exist yet) and the ETag to swap against."""

    name: str
    alias: str
    record: dict | None
    etag: str | None

    @property
    def version(self) -> int | None:
        return None if self.record is None else self.record["version"]


class Registry:
    """A model registry over a `Storage` (local folder or S3)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @property
    def location(self) -> str:
        return self.storage.location

    # ------------------------------------------------------------------------------ keys

    @staticmethod
    def _versions_prefix(name: str) -> str:
        return f"models/{check_name(name)}/versions/"

    def _version_key(self, name: str, version: int, file: str) -> str:
        return f"{self._versions_prefix(name)}{version}/{file}"

    @staticmethod
    def _alias_key(name: str, alias: str) -> str:
        return f"models/{check_name(name)}/aliases/{check_alias(alias)}.json"

    def _version_objects(self, name: str) -> dict[int, list]:
        """Every object under each version number, committed or not."""
        prefix = self._versions_prefix(name)
        out: dict[int, list] = {}
        for obj in self.storage.list(prefix):
            number, _, rest = obj.key[len(prefix):].partition("/")
            if number.isdigit() and rest:
                out.setdefault(int(number), []).append(obj)
        return out

    # ------------------------------------------------------------------------------ reading

    def versions(self, name: str) -> list[int]:
        """Committed versions of `name` (those with a manifest), ascending."""
        prefix = self._versions_prefix(name)
        return sorted(v for v, objs in self._version_objects(name).items()
                      if any(o.key == f"{prefix}{v}/{MANIFEST}" for o in objs))

    def names(self) -> list[str]:
        """Models with at least one committed version."""
        names = {o.key.split("/")[1] for o in self.storage.list("models/") if o.key.endswith("/" + MANIFEST)}
        return sorted(n for n in names if self.versions(n))

    def resolve(self, spec: str | Spec) -> tuple[str, int]:
        """A spec -> (name, version) of a committed version."""
        s = parse_spec(spec) if isinstance(spec, str) else spec
        if s.alias is not None:
            state = self.alias(s.name, s.alias)
            if state.record is None:
                raise RegistryError(f"model {s}: no alias {s.alias!r} for {s.name!r} in {self.location}")
            return s.name, state.version
        versions = self.versions(s.name)
        if not versions:
            raise RegistryError(f"model {s.name!r}: no registered version in {self.location}")
        if s.version is None:
            return s.name, versions[-1]
        if s.version not in versions:
            raise RegistryError(f"model {s}: no such version in {self.location}; versions: {versions}")
        return s.name, s.version

    def manifest(self, spec: str | Spec) -> dict:
        name, version = self.resolve(spec)
        got = self.storage.get(self._version_key(name, version, MANIFEST))
        if got is None:
            raise RegistryError(f"model {name}:{version}: manifest vanished from {self.location}")
        return json.loads(got[0])

    # ------------------------------------------------------------------------------ registering

    def _claim(self, name: str) -> int:
        taken = self._version_objects(name)
        number = max(taken, default=0) + 1
        token = uuid.uuid4().hex
        body = _dumps({"claimed_at": now_iso(), "by": whoami(), "token": token})
        for _ in range(10_000):
            key = self._version_key(name, number, CLAIM)
            try:
                self.storage.put(key, body, if_none_match=True)
                return number
            except Conflict:
                got = self.storage.get(key)  # a retried request may have won for us already
                if got is not None and json.loads(got[0]).get("token") == token:
                    return number
                number += 1
        raise RegistryError(f"model {name!r}: could not claim a version number in {self.location}")

    def register(self, name: str, files: dict[str, str | Path], metadata: dict | None = None) -> int:
        """Upload `files` (name in the version -> a file, or a folder uploaded recursively) as a new
        version, with `metadata` in its manifest; return the version number."""
        check_name(name)
        entries: dict[str, Path] = {}
        for target, source in sorted(files.items()):
            source = Path(source)
            if source.is_dir():
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    entries[f"{target}/{path.relative_to(source).as_posix()}"] = path
            elif source.is_file():
                entries[target] = source
            else:
                raise RegistryError(f"{source}: file to register as {target} of model {name!r} not found")
        reserved = {MANIFEST, CLAIM} & set(entries)
        if reserved:
            raise RegistryError(f"model {name!r}: {sorted(reserved)[0]} is reserved by the registry")
        described = {t: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for t, p in entries.items()}
        version = self._claim(name)
        for target, path in entries.items():
            self.storage.upload_file(self._version_key(name, version, target), path)
        manifest = {**(metadata or {}), "name": name, "version": version, "created_at": now_iso(),
                    "files": described}
        try:
            self.storage.put(self._version_key(name, version, MANIFEST), _dumps(manifest), if_none_match=True)
        except Conflict:
            raise RegistryError(f"model {name}:{version}: a manifest already exists (the claim was collected "
                                "by gc while this registration ran?); nothing committed") from None
        log.info("registry: registered %s:%d in %s", name, version, self.location)
        return version

    # ------------------------------------------------------------------------------ aliases

    def alias(self, name: str, alias: str) -> AliasState:
        got = self.storage.get(self._alias_key(name, alias))
        if got is None:
            return AliasState(name, alias, None, None)
        return AliasState(name, alias, json.loads(got[0]), got[1])

    def aliases(self, name: str) -> dict[str, int]:
        prefix = f"models/{check_name(name)}/aliases/"
        out = {}
        for obj in self.storage.list(prefix):
            rest = obj.key[len(prefix):]
            if "/" not in rest and rest.endswith(".json"):
                state = self.alias(name, rest[:-len(".json")])
                if state.record is not None:
                    out[state.alias] = state.version
        return out

    def promote(self, name: str, version: int, alias: str, *, expected: AliasState | None = None,
                reason: str | None = None) -> dict:
        """Point `name@alias` at a committed `version` by compare-and-swap against `expected` (read now
        if not given). Losing the race raises a RegistryError naming the alias and the winning version."""
        name, version = self.resolve(Spec(name, version=int(version)))
        state = expected if expected is not None else self.alias(name, alias)
        attempt = uuid.uuid4().hex
        record = {"version": version, "updated_at": now_iso(), "by": whoami(), "attempt": attempt}
        if reason:
            record["reason"] = reason
        key = self._alias_key(name, alias)
        try:
            if state.etag is None:
                self.storage.put(key, _dumps(record), if_none_match=True)
            else:
                self.storage.put(key, _dumps(record), if_match=state.etag)
            won, actual = True, version
        except Conflict:
            now = self.alias(name, alias)
            won = now.record is not None and now.record.get("attempt") == attempt  # a retried request won
            actual = now.version
        self._record_history(name, alias, {"outcome": "won" if won else "lost", "version": version,
                                           "expected_previous": state.version, "actual_previous":
                                           state.version if won else actual, "at": record["updated_at"],
                                           "by": record["by"], "reason": reason})
        if not won:
            raise RegistryError(f"alias {name}@{alias}: promoting version {version} lost the race: "
                                f"{name}@{alias} now points to version {actual} "
                                f"(expected {state.version}); not retried")
        log.info("registry: %s@%s -> %d (was %s)", name, alias, version, state.version)
        return record

    def _record_history(self, name: str, alias: str, entry: dict) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        key = f"models/{name}/aliases/{alias}.history/{stamp}-{uuid.uuid4().hex}.json"
        self.storage.put(key, _dumps(entry), if_none_match=True)

    def history(self, name: str, alias: str) -> list[dict]:
        """Every promotion attempt of `name@alias`, oldest first."""
        prefix = f"models/{check_name(name)}/aliases/{check_alias(alias)}.history/"
        out = []
        for obj in self.storage.list(prefix):
            got = self.storage.get(obj.key)
            if got is not None:
                out.append(json.loads(got[0]))
        return out

    # ------------------------------------------------------------------------------ pulling

    def pull(self, spec: str | Spec, dest: str | Path) -> Path:
        """Copy a version to `dest` (absent or an empty folder), verifying every file's sha256; on any
        failure `dest` is left as it was."""
        name, version = self.resolve(spec)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"{dest}: destination exists and is not an empty folder; refusing to overwrite it")
        manifest = self.manifest(Spec(name, version=version))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            self.download_version(name, version, manifest, tmp)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registry: pulled %s:%d to %s", name, version, dest)
        return dest

    def download_version(self, name: str, version: int, manifest: dict, folder: Path) -> None:
        """Download every file of the manifest into `folder` and verify it; then write the manifest."""
        for target, entry in sorted(manifest["files"].items()):
            path = folder / target
            path.parent.mkdir(parents=True, exist_ok=True)
            key = self._version_key(name, version, target)
            try:
                actual = self.storage.download_file(key, path)
            except RegistryError as err:
                raise RegistryError(f"model {name}:{version}: file {target} listed in the manifest cannot be "
                                    f"read: {err}") from None
            if actual != entry["sha256"]:
                raise RegistryError(f"model {name}:{version}: file {target} fails verification: sha256 {actual}, "
                                    f"manifest says {entry['sha256']}; refusing it")
        (folder / MANIFEST).write_bytes(_dumps(manifest))

    # ------------------------------------------------------------------------------ gc

    def gc(self, name: str | None = None, older_than: float = 3600.0) -> list[dict]:
        """Delete the objects of uncommitted versions (no manifest) whose claim (or newest object) is
        older than `older_than` seconds; return what was removed, one entry per version."""
        names = [check_name(name)] if name else sorted({o.key.split("/")[1] for o in self.storage.list("models/")
                                                         if o.key.count("/") >= 3})
        now = dt.datetime.now(dt.timezone.utc)
        removed = []
        for model in names:
            prefix = self._versions_prefix(model)
            for version, objs in sorted(self._version_objects(model).items()):
                keys = [o.key for o in objs]
                if f"{prefix}{version}/{MANIFEST}" in keys:
                    continue
                claim = [o for o in objs if o.key.endswith("/" + CLAIM)]
                when = (claim[0] if claim else max(objs, key=lambda o: o.last_modified)).last_modified
                age = (now - when).total_seconds()
                if age < older_than:
                    continue
                self.storage.delete(keys)
                removed.append({"name": model, "version": version, "age_seconds": round(age, 1),
                                "objects": [k[len(prefix):] for k in keys]})
                log.info("registry gc: removed uncommitted %s:%d (%d objects)", model, version, len(keys))
        return removed
