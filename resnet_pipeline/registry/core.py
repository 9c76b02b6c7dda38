"""Versions, aliases, pulls and garbage collection, the same over every storage backend.

    models/<name>/versions/<N>/{_claim.json, _heartbeat.json, model.keras, saved_model/..., params.yaml,
                                metrics.json, labels.json, manifest.json}
    models/<name>/aliases/<alias>.json
    models/<name>/aliases/<alias>.history/<timestamp>-<uuid>.json
    models/<name>/tokens/<token>.json      (which version a registration's token made)

A version number is claimed by creating `_claim.json` in its folder only if it does not exist;
a writer that loses takes the next number. The files go up next, with a heartbeat, and
`manifest.json` (sha256 and size of every file, the metadata and the registration's token) last:
it is the commit point, and a version without it is invisible. `claims.py` says what keeps that
safe against crashes, retries, gc and stores without conditional writes; `pull.py` what keeps a
pull inside its destination; `aliases.py` how an alias is swapped and its history kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from resnet_pipeline.fileio import current_umask, sha256_file
from resnet_pipeline.registry import aliases as alias_records
from resnet_pipeline.registry import claims, pull
from resnet_pipeline.registry.aliases import AliasState
from resnet_pipeline.registry.claims import dumps as _dumps
from resnet_pipeline.registry.claims import loads as _loads
from resnet_pipeline.registry.claims import now_iso, whoami
from resnet_pipeline.registry.manifest import (
    CLAIM,
    HEARTBEAT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    RESERVED,
    check_file_name,
    check_manifest,
)
from resnet_pipeline.registry.spec import NAME_RE, Spec, check_name, parse_spec
from resnet_pipeline.registry.storage import Conflict, RegistryError, Storage

log = logging.getLogger(__name__)

GC_AGE = 86400.0  # seconds: an uncommitted version whose newest object is younger is never collected
HEARTBEAT_SECONDS = 60.0


class Registry:
    """A model registry over a `Storage` (local folder or S3).

    `allow_unsafe_store` lets writes go on to a store that fails the conditional-write probe;
    `heartbeat_seconds` is how often a registration refreshes its claim while it uploads."""

    def __init__(
        self, storage: Storage, *, allow_unsafe_store: bool = False, heartbeat_seconds: float = HEARTBEAT_SECONDS
    ):
        self.storage = storage
        self.allow_unsafe_store = allow_unsafe_store
        self.heartbeat_seconds = heartbeat_seconds

    @property
    def location(self) -> str:
        return self.storage.location

    # ------------------------------------------------------------------------------ keys

    @staticmethod
    def _versions_prefix(name: str) -> str:
        return f"models/{check_name(name)}/versions/"

    def _version_key(self, name: str, version: int, file: str) -> str:
        return f"{self._versions_prefix(name)}{version}/{file}"

    def _version_objects(self, name: str) -> dict[int, list]:
        """Every object under each version number, committed or not."""
        prefix = self._versions_prefix(name)
        out: dict[int, list] = {}
        for obj in self.storage.list(prefix):
            number, _, rest = obj.key[len(prefix) :].partition("/")
            if number.isdigit() and rest:
                out.setdefault(int(number), []).append(obj)
        return out

    # ------------------------------------------------------------------------------ reading

    def versions(self, name: str) -> list[int]:
        """Committed versions of `name` (those with a manifest), ascending."""
        prefix = self._versions_prefix(name)
        return sorted(
            v
            for v, objs in self._version_objects(name).items()
            if any(o.key == f"{prefix}{v}/{MANIFEST}" for o in objs)
        )

    def names(self) -> list[str]:
        """Models with at least one committed version."""
        names = {o.key.split("/")[1] for o in self.storage.list("models/") if o.key.endswith("/" + MANIFEST)}
        return sorted(n for n in names if self.versions(n))

    def resolve(self, spec: str | Spec) -> tuple[str, int]:
        """A spec -> (name, version) of a committed version."""
        s = parse_spec(spec) if isinstance(spec, str) else spec
        if s.alias is not None:
            state = self.alias(s.name, s.alias)
            if state.version is None:
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
        """The checked manifest of a committed version (see `manifest_bytes`)."""
        return self.manifest_bytes(spec)[0]

    def manifest_bytes(self, spec: str | Spec) -> tuple[dict, bytes]:
        """(manifest, its bytes as stored) of a committed version, refused unless every file name in
        it is safe and it names this model and version."""
        name, version = self.resolve(spec)
        key = self._version_key(name, version, MANIFEST)
        got = self.storage.get(key, max_bytes=MAX_MANIFEST_BYTES)
        if got is None:
            raise RegistryError(f"model {name}:{version}: manifest vanished from {self.location}")
        what = f"model {name}:{version}: {self.storage.url(key)}"
        return check_manifest(_loads(got[0], what), what, name=name, version=version), got[0]

    def _record(self, key: str, what: str) -> tuple[dict, str] | None:
        """A small JSON object of the registry's own (claim, token, alias), with its etag."""
        return claims.read_record(self.storage, key, what)

    # ------------------------------------------------------------------------------ registering

    def _ensure_safe(self) -> None:
        claims.ensure_safe(self.storage, self.allow_unsafe_store)

    def _token_key(self, name: str, token: str) -> str:
        return f"models/{check_name(name)}/tokens/{token}.json"

    def find_registration(self, name: str, token: str) -> tuple[int, bool] | None:
        """(version, committed) of the registration with `token`, if one committed it or left a claim
        that still holds it; None otherwise."""
        found = self._record(self._token_key(name, token), "registration token")
        version = found[0].get("version") if found else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            return None
        manifest = self._record(self._version_key(name, version, MANIFEST), "manifest")
        if manifest is not None:
            return (version, True) if manifest[0].get("token") == token else None
        claim = self._record(self._version_key(name, version, CLAIM), "claim")
        return (version, False) if claim is not None and claim[0].get("token") == token else None

    def _claim(self, name: str, token: str) -> int:
        taken = self._version_objects(name)
        number = max(taken, default=0) + 1
        body = _dumps({"claimed_at": now_iso(), "by": whoami(), "token": token})
        for _ in range(10_000):
            key = self._version_key(name, number, CLAIM)
            try:
                self.storage.put(key, body, if_none_match=True)
                break
            except Conflict:
                try:
                    got = self._record(key, "claim")  # a retried request may have won for us already
                except RegistryError:  # not even JSON: certainly not ours
                    got = None
                if got is not None and got[0].get("token") == token:
                    break
                number += 1
        else:
            raise RegistryError(f"model {name!r}: could not claim a version number in {self.location}")
        self.storage.put(self._token_key(name, token), _dumps({"version": number, "at": now_iso()}))
        return number

    def _collect(self, name: str, files: Mapping[str, str | Path]) -> dict[str, Path]:
        """Version file name -> local file, folders expanded; every name checked."""
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
        for target in entries:
            if target.split("/")[0] in RESERVED:
                raise RegistryError(f"model {name!r}: {target.split('/')[0]} is reserved by the registry")
            check_file_name(target, f"model {name!r}")
        return entries

    def registration_token(self, name: str, files: Mapping[str, str | Path], context: dict | None = None) -> str:
        """A token for registering these files (by content) with `context` (what else makes the
        registration, e.g. its params): the same files and context give the same token."""
        return claims.content_token(check_name(name), _describe(self._collect(name, files)), context or {})

    def register(
        self, name: str, files: Mapping[str, str | Path], metadata: dict | None = None, *, token: str | None = None
    ) -> int:
        """Upload `files` (name in the version -> a file, or a folder uploaded recursively) as a new
        version, with `metadata` in its manifest; return the version number.

        `token` names this registration (default: a new one, so every call makes a version): a retry
        with the same token returns the version the first attempt committed, or finishes the version
        it claimed, instead of making another (`registration_token` makes one from the content)."""
        check_name(name)
        self._ensure_safe()
        entries = self._collect(name, files)
        described = _describe(entries)
        token = token or uuid.uuid4().hex
        claims.check_token(token)
        found = self.find_registration(name, token)
        if found is not None and found[1]:
            log.info(
                "registry: %s:%d already holds this registration (token %s); not registering it again",
                name,
                found[0],
                token,
            )
            return found[0]
        version = found[0] if found is not None else self._claim(name, token)
        beat = {"token": token, "by": whoami()}
        with claims.Heartbeat(self.storage, self._version_key(name, version, HEARTBEAT), beat, self.heartbeat_seconds):
            etags = {t: self.storage.upload_file(self._version_key(name, version, t), p) for t, p in entries.items()}
            self._check_before_commit(name, version, token, described, etags)
            manifest = {
                **(metadata or {}),
                "name": name,
                "version": version,
                "created_at": now_iso(),
                "token": token,
                "files": described,
            }
            self._commit(name, version, token, manifest)
        log.info("registry: registered %s:%d in %s", name, version, self.location)
        return version

    def _check_before_commit(self, name: str, version: int, token: str, described: dict, etags: dict) -> None:
        """The claim is still ours and every file is there as uploaded; then the claim is sealed, so gc
        keeps off the version from here to the manifest (see `claims`). Else nothing is committed."""
        what = f"model {name}:{version}"
        key = self._version_key(name, version, CLAIM)
        claim = self._record(key, "claim")
        if claim is None or claim[0].get("token") != token:
            raise claims.lost_claim(what)
        for target, entry in described.items():
            info = self.storage.head(self._version_key(name, version, target))
            if info is None or info.size != entry["bytes"] or (etags.get(target) and info.etag != etags[target]):
                state = "is missing" if info is None else f"is {info.size} bytes, etag {info.etag}"
                raise RegistryError(
                    f"{what}: uploaded file {target} {state} (expected "
                    f"{entry['bytes']} bytes, etag {etags.get(target)}); nothing committed"
                )
        claims.seal(self.storage, key, token, claim, what)

    def _commit(self, name: str, version: int, token: str, manifest: dict) -> None:
        """Create the manifest, idempotently: a failed or conflicting write that left our own manifest
        (same token) is a success."""
        key = self._version_key(name, version, MANIFEST)
        failure: Exception | None = None
        try:
            self.storage.put(key, _dumps(manifest), if_none_match=True)
            return
        except Conflict:
            pass
        except RegistryError as err:  # the request may have succeeded with its response lost
            failure = err
        try:
            there = self._record(key, "manifest")
        except RegistryError:
            there = None
        if there is not None and there[0].get("token") == token:
            log.info("registry: %s:%d: the manifest is already there with this registration's token", name, version)
            return
        if failure is not None:
            raise failure
        raise RegistryError(
            f"model {name}:{version}: a manifest of another registration already exists (the claim "
            "was collected by gc while this registration ran?); nothing committed"
        )

    # ------------------------------------------------------------------------------ aliases

    def alias(self, name: str, alias: str) -> AliasState:
        return alias_records.read(self.storage, name, alias)

    def aliases(self, name: str) -> dict[str, int]:
        return alias_records.read_all(self.storage, name)

    def promote(
        self, name: str, version: int, alias: str, *, expected: AliasState | None = None, reason: str | None = None
    ) -> dict:
        """Point `name@alias` at a committed `version` by compare-and-swap against `expected` (read now
        if not given). Losing the race raises a RegistryError naming the alias and the winning version."""
        self._ensure_safe()
        name, version = self.resolve(Spec(name, version=int(version)))
        state = expected if expected is not None else self.alias(name, alias)
        return alias_records.swap(self.storage, name, version, alias, state, reason)

    def history(self, name: str, alias: str) -> list[dict]:
        """Every promotion attempt of `name@alias`, oldest first."""
        return alias_records.history(self.storage, name, alias)

    # ------------------------------------------------------------------------------ pulling

    def pull(self, spec: str | Spec, dest: str | Path) -> Path:
        """Copy a version to `dest` (absent or an empty folder), verifying every file's size and sha256;
        on any failure `dest` is left as it was (absent stays absent)."""
        name, version = self.resolve(spec)
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
            raise RegistryError(f"{dest}: destination exists and is not an empty folder; refusing to overwrite it")
        manifest, raw = self.manifest_bytes(Spec(name, version=version))  # checked before anything is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            self.download_version(name, version, manifest, tmp, raw)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a pulled model is as readable as any folder
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("registry: pulled %s:%d to %s", name, version, dest)
        return dest

    def download_version(
        self, name: str, version: int, manifest: dict, folder: Path, manifest_bytes: bytes | None = None
    ) -> None:
        """Download every file of the manifest into `folder` (a new, empty folder of this process) and
        verify it; then write the manifest. See `pull.py` for what keeps the files inside `folder`."""
        pull.download_version(
            self.storage,
            lambda target: self._version_key(name, version, target),
            f"model {name}:{version}",
            manifest,
            Path(folder),
            manifest_bytes if manifest_bytes is not None else _dumps(manifest),
        )

    def fetch_file(self, spec: str | Spec, file: str, dest: str | Path) -> Path:
        """One file of a committed version to `dest`, verified against the manifest (size and sha256)."""
        name, version = self.resolve(spec)
        manifest, _ = self.manifest_bytes(Spec(name, version=version))
        entry = manifest["files"].get(file)
        if entry is None:
            raise RegistryError(f"model {name}:{version}: no file {file!r} in the version")
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part")
        try:
            actual = self.storage.download_file(self._version_key(name, version, file), part, size=entry["bytes"])
            if actual != entry["sha256"]:
                raise RegistryError(
                    f"model {name}:{version}: file {file} fails verification: sha256 {actual}, "
                    f"manifest says {entry['sha256']}; refusing it"
                )
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return dest

    # ------------------------------------------------------------------------------ gc

    def gc(self, name: str | None = None, older_than: float = GC_AGE, *, now: dt.datetime | None = None) -> list[dict]:
        """Delete the objects of uncommitted versions (no manifest) whose newest object (claim, heartbeat
        or file) is older than `older_than` seconds; return what was removed, one entry per version.
        A registration that is alive keeps its heartbeat younger than that; the default is a day.

        gc takes a version's claim by compare-and-swap before it deletes anything, and keeps off a
        claim its registration has sealed for the commit (`claims.collect`), so it never deletes the
        files of a version that is being committed. The claim goes last."""
        if not older_than >= 0:  # NaN too: every age would pass it
            raise RegistryError(f"gc: older_than {older_than} is negative or not a number")
        names = (
            [check_name(name)]
            if name
            else sorted(
                {
                    o.key.split("/")[1]
                    for o in self.storage.list("models/")
                    if o.key.count("/") >= 3 and NAME_RE.match(o.key.split("/")[1])
                }
            )
        )
        now = now or dt.datetime.now(dt.UTC)
        removed = []
        for model in names:
            prefix = self._versions_prefix(model)
            for version, objs in sorted(self._version_objects(model).items()):
                manifest, claim = f"{prefix}{version}/{MANIFEST}", f"{prefix}{version}/{CLAIM}"
                if any(o.key == manifest for o in objs):
                    continue
                age = (now - max(o.last_modified for o in objs)).total_seconds()
                if age < older_than:
                    continue
                if self.storage.head(manifest) is not None:
                    continue  # committed since the listing
                if not claims.collect(self.storage, claim, f"model {model}:{version}"):
                    continue
                if self.storage.head(manifest) is not None:  # only a registration that never sealed
                    log.warning("registry gc: %s:%d was committed without a seal; kept", model, version)
                    continue
                keys = [o.key for o in self.storage.list(f"{prefix}{version}/")]  # uploads since the listing too
                self.storage.delete([k for k in keys if k != claim])
                self.storage.delete([claim])
                if not any(o.key == claim for o in objs):  # the one gc made to take the version
                    keys = [k for k in keys if k != claim]
                removed.append(
                    {
                        "name": model,
                        "version": version,
                        "age_seconds": round(age, 1),
                        "objects": [k[len(prefix) :] for k in keys],
                    }
                )
                log.info("registry gc: removed uncommitted %s:%d (%d objects)", model, version, len(keys))
        return removed


def _describe(entries: dict[str, Path]) -> dict[str, dict]:
    return {t: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for t, p in entries.items()}
