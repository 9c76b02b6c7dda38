"""Aliases: `models/<name>/aliases/<alias>.json` names a committed version.

An alias is replaced by compare-and-swap on its ETag (`If-None-Match: *` when it does not exist
yet, `If-Match: <etag>` otherwise); every attempt, won or lost, is recorded as its own object under
`models/<name>/aliases/<alias>.history/` before any error is raised.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from resnet_pipeline.registry.claims import dumps, now_iso, read_record, whoami
from resnet_pipeline.registry.spec import check_alias, check_name
from resnet_pipeline.registry.storage import Conflict, RegistryError, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasState:
    """An alias as read: its record (None if it does not exist yet) and the ETag to swap against."""

    name: str
    alias: str
    record: dict | None
    etag: str | None

    @property
    def version(self) -> int | None:
        return None if self.record is None else int(self.record["version"])


def alias_key(name: str, alias: str) -> str:
    return f"models/{check_name(name)}/aliases/{check_alias(alias)}.json"


def read(storage: Storage, name: str, alias: str) -> AliasState:
    """`name@alias` as stored now; its record must name a positive version."""
    got = read_record(storage, alias_key(name, alias), f"alias {name}@{alias}:")
    if got is None:
        return AliasState(name, alias, None, None)
    version = got[0].get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(
            f"alias {name}@{alias}: {storage.url(alias_key(name, alias))} names "
            f"version {version!r}, not a positive integer"
        )
    return AliasState(name, alias, got[0], got[1])


def read_all(storage: Storage, name: str) -> dict[str, int]:
    """Every alias of `name` and the version it names."""
    prefix = f"models/{check_name(name)}/aliases/"
    out: dict[str, int] = {}
    for obj in storage.list(prefix):
        rest = obj.key[len(prefix) :]
        if "/" not in rest and rest.endswith(".json"):
            state = read(storage, name, rest[: -len(".json")])
            if state.version is not None:
                out[state.alias] = state.version
    return out


def swap(storage: Storage, name: str, version: int, alias: str, state: AliasState, reason: str | None = None) -> dict:
    """Point `name@alias` at `version` (committed: the caller checked) if it is still as `state` read
    it; record the attempt. Losing the race raises a RegistryError naming the winning version."""
    attempt = uuid.uuid4().hex
    record = {"version": version, "updated_at": now_iso(), "by": whoami(), "attempt": attempt}
    if reason:
        record["reason"] = reason
    key = alias_key(name, alias)
    try:
        if state.etag is None:
            storage.put(key, dumps(record), if_none_match=True)
        else:
            storage.put(key, dumps(record), if_match=state.etag)
        won, actual = True, version
    except Conflict:
        now = read(storage, name, alias)
        won = now.record is not None and now.record.get("attempt") == attempt  # a retried request won
        actual = now.version if now.version is not None else version
    _record_history(
        storage,
        name,
        alias,
        {
            "outcome": "won" if won else "lost",
            "version": version,
            "expected_previous": state.version,
            "actual_previous": state.version if won else actual,
            "at": record["updated_at"],
            "by": record["by"],
            "reason": reason,
        },
    )
    if not won:
        raise RegistryError(
            f"alias {name}@{alias}: promoting version {version} lost the race: "
            f"{name}@{alias} now points to version {actual} "
            f"(expected {state.version}); not retried"
        )
    log.info("registry: %s@%s -> %d (was %s)", name, alias, version, state.version)
    return record


def _record_history(storage: Storage, name: str, alias: str, entry: dict) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"models/{name}/aliases/{alias}.history/{stamp}-{uuid.uuid4().hex}.json"
    storage.put(key, dumps(entry), if_none_match=True)


def history(storage: Storage, name: str, alias: str) -> list[dict]:
    """Every promotion attempt of `name@alias`, oldest first."""
    prefix = f"models/{check_name(name)}/aliases/{check_alias(alias)}.history/"
    out = []
    for obj in storage.list(prefix):
        got = read_record(storage, obj.key, "alias history record")
        if got is not None:
            out.append(got[0])
    return out
