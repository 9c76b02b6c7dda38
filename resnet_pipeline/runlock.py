"""One run at a time per folder: an exclusive `flock` on `<folder>/.resnet-pipeline.lock`.

The lock file names its holder (pid, host, start time, and the Prefect flow run when there is
one). The kernel drops a `flock` when its process dies, so the lock of a dead run is free; the
next run takes it over and logs whose it was. `flock` holds across the processes of one machine
and on local file systems; it is not a lock across machines on NFS.

A run of several processes holds one lock: `train --workers N` takes it and hands its workers a
token (`RUN_TOKEN_ENV`) whose digest its record carries (`under_launcher`); the members of one
multi-worker cluster that share a folder run under the lock of the first of them (`cluster_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".resnet-pipeline.lock"
RUN_TOKEN_ENV = "RESNET_PIPELINE_RUN_TOKEN"  # a launcher's word to its workers: run under my lock


class FolderLocked(RuntimeError):
    """Another run holds the folder; `holder` is its record."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


class Holder(dict):
    """The record of the run holding a folder, as written into the lock file; `fd` is the locked
    file, for a launcher to hand down to its workers (the lock then lasts as long as any of them)."""

    fd: int = -1


def describe(holder: dict | None) -> str:
    """A holder record in one line, for messages."""
    if not holder:
        return "an unknown run (no holder recorded)"
    run = holder.get("flow_run_name") or holder.get("command") or "a run"
    ident = f" (flow run {holder['flow_run_id']})" if holder.get("flow_run_id") else ""
    return f"{run}{ident}, pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}"


def _read_holder(f) -> dict | None:
    f.seek(0)
    text = f.read()
    try:
        holder = json.loads(text) if text.strip() else None
    except ValueError:
        return {"unreadable": text[:200]}
    return holder if isinstance(holder, dict) else None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


@contextmanager
def folder_lock(
    folder: str | Path, owner: dict | None = None, wait: float = 0.0, poll: float = 1.0
) -> Iterator[Holder]:
    """Hold the lock of `folder` for the block; yield the holder record written into it.

    If another live run holds it: wait up to `wait` seconds, then raise FolderLocked naming that run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    path = folder / LOCK_FILE
    holder = Holder(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **(owner or {}),
        }
    )
    with open(path, "a+") as f:
        holder.fd = f.fileno()
        deadline = time.monotonic() + wait
        while not _try_lock(f.fileno()):
            if time.monotonic() >= deadline:
                other = _read_holder(f)
                raise FolderLocked(
                    f"{folder}: in use by {describe(other)}; "
                    f"only one run at a time may use a folder (lock file {path})",
                    other,
                )
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.01)))
        previous = _read_holder(f)
        if previous:  # its process died holding the lock (a clean release empties the file)
            log.warning("taking over the lock of %s, which ended without releasing it", describe(previous))
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
        log.info("holding %s for %s", path, describe(holder))
        try:
            yield holder
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_run_token() -> tuple[str, dict]:
    """A launcher's token for its workers, and the field of its lock record that vouches for it (a
    digest: whoever can read the lock file does not learn the token)."""
    token = secrets.token_hex(16)
    return token, {"run_token_sha256": _digest(token)}


@contextmanager
def under_launcher(folder: str | Path, token: str) -> Iterator[dict]:
    """For a launcher's worker: check that the lock of `folder` is held, by the launcher whose token
    is `token`, and yield its record; the launcher holds the folder for the whole run.

    Raises FolderLocked when another run holds it, RuntimeError when nobody does.
    """
    folder = Path(folder).resolve()
    path = folder / LOCK_FILE
    try:
        f = open(path)
    except FileNotFoundError:
        f = None
    with f or contextlib.nullcontext():
        if f is None or _try_lock(f.fileno()):
            if f is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            raise RuntimeError(
                f"{RUN_TOKEN_ENV} is set, but no launcher holds {folder}: it is for the workers of "
                "`resnet-pipeline train --workers N` while their launcher runs; unset it"
            )
        holder = _read_holder(f) or {}
    vouched = holder.get("run_token_sha256")
    if not isinstance(vouched, str) or not hmac.compare_digest(vouched, _digest(token)):
        raise FolderLocked(
            f"{folder}: in use by {describe(holder)}, which is not the launcher that gave this "
            f"{RUN_TOKEN_ENV}; only one run at a time may use a folder (lock file {path})",
            holder,
        )
    log.info("running under the lock of %s, this worker's launcher", describe(holder))
    yield holder


@contextmanager
def cluster_lock(folder: str | Path, owner: dict) -> Iterator[dict]:
    """The lock of `folder` for one member of a multi-worker cluster (`owner` names its `cluster` and
    `task`): when another task of the same cluster holds the folder, run under its lock."""
    with contextlib.ExitStack() as stack:
        holder: dict
        try:
            holder = stack.enter_context(folder_lock(folder, owner))
        except FolderLocked as err:
            other = err.holder or {}
            if other.get("cluster") != owner["cluster"] or other.get("task") == owner["task"]:
                raise
            log.info("%s: held by %s of this cluster; %s runs under its lock", folder, other["task"], owner["task"])
            holder = other
        yield holder
