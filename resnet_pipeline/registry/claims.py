"""What makes a registration safe against crashes, retries, gc and weak stores.

- **Probe.** Before its first write a process checks, once per store, that a create-if-absent of an
  existing object and a replace with a stale ETag are both refused; a store that accepts either
  would let two writers take one version number or overwrite each other's alias.
- **Token.** Every registration carries a token (the register stage's is a digest of the model
  name, every file's sha256, the params and the data it records), written in its claim and its
  manifest. A retry of the same registration
  finds it through `tokens/<token>.json` and returns the version already committed, or resumes the
  claim a crashed attempt left, instead of making a second version.
- **Heartbeat.** While files go up, `_heartbeat.json` under the version is rewritten every
  `interval` seconds, so `gc` (which judges a version's age by its newest object) never takes a
  live upload for an abandoned one.
- **Re-check, seal, then commit.** Just before the manifest, the claim is read again (its token
  must be ours) and every file is HEADed (size and ETag as uploaded). Then the claim is *sealed*:
  rewritten with `committing_at`, by compare-and-swap on the ETag just read (`seal`). The manifest
  goes up with `If-None-Match: *`; a write that fails or meets an existing manifest reads it back,
  and its own token there means success.
- **gc takes the claim first.** Before it deletes anything of an uncommitted version, gc replaces
  its claim with a `collected_at` record by compare-and-swap on the claim's ETag (or creates one
  with `If-None-Match: *` where there is none), and leaves a sealed claim alone (`collect`). Both
  sides swap the same object from the same ETag, so exactly one wins: either the registration
  sealed first, and gc never deletes the files of a version being committed, or gc took the claim
  first, and the seal fails, so nothing is committed. No interleaving leaves a listed version with
  a file missing. The price: a registration that dies between its seal and its manifest (one
  request) leaves a sealed version that gc reports and keeps; a retry of that registration (same
  token) finishes it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import threading
import uuid

from resnet_pipeline.registry.storage import Conflict, RegistryError, Storage

log = logging.getLogger(__name__)

_PROBED: dict[tuple[str, str], list[str]] = {}  # (backend, location) -> what it lacks; per process
_PROBE_LOCK = threading.Lock()
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_RECORD_BYTES = 1024 * 1024  # claims, aliases, history records, tokens
SEALED = "committing_at"  # in a claim: its registration is writing the manifest; gc keeps off


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def loads(data: bytes, what: str):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise RegistryError(f"{what}: not valid JSON ({err})") from None


def read_record(storage: Storage, key: str, what: str) -> tuple[dict, str] | None:
    """A small JSON object of the registry's own (claim, token, alias), with its etag; None if absent."""
    got = storage.get(key, max_bytes=MAX_RECORD_BYTES)
    if got is None:
        return None
    record = loads(got[0], f"{what} {storage.url(key)}")
    if not isinstance(record, dict):
        raise RegistryError(f"{what} {storage.url(key)}: not a JSON object")
    return record, got[1]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def whoami() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def content_token(name: str, files: dict[str, dict], context: dict) -> str:
    """The token of registering exactly these files (name -> sha256 and bytes) as model `name`, with
    `context` (JSON-able: the params and data the registration records)."""
    body = json.dumps({"name": name, "files": files, "context": context}, sort_keys=True, default=str).encode()
    return hashlib.sha256(body).hexdigest()[:32]


def check_token(token: str) -> str:
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        raise RegistryError(f"registration token {token!r}: expected 8 to 64 letters, digits, '-' or '_'")
    return token


def probe(storage: Storage) -> list[str]:
    """What `storage` lacks of conditional writes, found by trying them on a probe object."""
    key = f"_probe/{uuid.uuid4().hex}.json"
    lacks: list[str] = []
    try:
        storage.put(key, b'{"probe": 1}\n', if_none_match=True)
    except (RegistryError, Conflict) as err:
        return [f"conditional create ({err})"]
    try:
        try:
            storage.put(key, b'{"probe": 2}\n', if_none_match=True)
            lacks.append("conditional create: a PUT with If-None-Match: * replaced an existing object")
        except Conflict:
            pass
        try:
            storage.put(key, b'{"probe": 3}\n', if_match='"0123456789abcdef0123456789abcdef"')
            lacks.append("compare-and-swap: a PUT with a stale If-Match ETag was accepted")
        except Conflict:
            pass
        except RegistryError as err:
            lacks.append(f"compare-and-swap ({err})")
    finally:
        storage.delete([key])
    return lacks


def ensure_safe(storage: Storage, allow_unsafe: bool) -> None:
    """Probe `storage` once per process; refuse a store without the guarantees unless allowed."""
    where = (type(storage).__name__, storage.location)
    with _PROBE_LOCK:
        if where not in _PROBED:
            _PROBED[where] = probe(storage)
        lacks = _PROBED[where]
    if not lacks:
        return
    endpoint = getattr(storage, "endpoint", None)
    at = f"registry {storage.location}" + (f" (endpoint {endpoint})" if endpoint else "")
    if allow_unsafe:
        log.warning(
            "%s lacks %s; going on because register.allow_unsafe_store is true: two writers can "
            "take the same version number or overwrite each other's alias",
            at,
            "; ".join(lacks),
        )
        return
    raise RegistryError(
        f"{at} does not give the guarantees the registry relies on: {'; '.join(lacks)}. "
        "Two writers could take the same version or overwrite each other's alias. Use a store "
        "that honours If-None-Match and If-Match (AWS S3, MinIO, SeaweedFS), or set "
        "register.allow_unsafe_store: true to accept the risk"
    )


def lost_claim(what: str) -> RegistryError:
    return RegistryError(
        f"{what}: this registration no longer holds its claim (collected by `registry gc`, or taken "
        "by another writer); nothing committed"
    )


def seal(storage: Storage, key: str, token: str, claim: tuple[dict, str] | None, what: str) -> None:
    """Mark the claim `key` (as read: record and ETag) as being committed, by compare-and-swap: from
    here gc leaves the version alone. Raises if the claim is not this registration's any more."""
    if claim is None or claim[0].get("token") != token:
        raise lost_claim(what)
    try:
        storage.put(key, dumps({**claim[0], SEALED: now_iso()}), if_match=claim[1])
    except Conflict:
        raise lost_claim(what) from None
    except RegistryError:  # S3 answers 404 to If-Match on an object gc deleted meanwhile
        again = read_record(storage, key, "claim")
        if again is None or again[0].get("token") != token or SEALED not in again[0]:
            raise lost_claim(what) from None


def collect(storage: Storage, key: str, what: str) -> bool:
    """Take the claim `key` of an uncommitted version for gc, by compare-and-swap on its ETag (create
    it where there is none); False, and nothing changed, if it is sealed or changed meanwhile."""
    got = storage.get(key, max_bytes=MAX_RECORD_BYTES)
    body = dumps({"collected_at": now_iso(), "by": whoami()})
    try:
        if got is None:
            storage.put(key, body, if_none_match=True)
            return True
        try:
            record = json.loads(got[0])
        except (ValueError, UnicodeDecodeError):
            record = None  # not a claim of ours: garbage like the rest of the version
        if isinstance(record, dict) and SEALED in record:
            log.warning(
                "registry gc: %s is being committed (sealed at %s, token %s) but has no manifest; "
                "left alone: a retry of that registration finishes it",
                what,
                record[SEALED],
                record.get("token"),
            )
            return False
        try:
            storage.put(key, body, if_match=got[1])
        except RegistryError:  # S3 answers 404 to If-Match on an object deleted meanwhile
            if storage.head(key) is not None:
                raise
            raise Conflict(key) from None
        return True
    except Conflict:
        log.info("registry gc: %s: its claim changed while gc looked at it; left alone", what)
        return False


class Heartbeat:
    """Rewrites `key` every `interval` seconds while the block runs (in a daemon thread)."""

    def __init__(self, storage: Storage, key: str, body: dict, interval: float):
        self.storage, self.key, self.body, self.interval = storage, key, body, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self.beats = 0

    def beat(self) -> None:
        self.storage.put(self.key, dumps({**self.body, "beat": self.beats}))
        self.beats += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as err:  # noqa: BLE001 - the re-check before the commit decides
                log.warning("registry: heartbeat %s failed: %s", self.key, err)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval))
