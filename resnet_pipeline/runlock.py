"""One run at a time per folder: an exclusive `flock` on `<folder>/.resnet-pipeline.lock`.

The lock file names its holder (pid, host, start time, and the Prefect flow run when there is
one). The kernel drops a `flock` when its process dies, so the lock of a dead run is free; the
next run takes it over and logs whose it was. `flock` holds across the processes of one machine
and on local file systems; it is not a lock across machines on NFS.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".resnet-pipeline.lock"


class FolderLocked(RuntimeError):
    """Another run holds the folder."""


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
def folder_lock(folder: str | Path, owner: dict | None = None, wait: float = 0.0, poll: float = 1.0) -> Iterator[dict]:
    """Hold the lock of `folder` for the block; yield the holder record written into it.

    If another live run holds it: wait up to `wait` seconds, then raise FolderLocked naming that run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    path = folder / LOCK_FILE
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(owner or {}),
    }
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait
        while not _try_lock(f.fileno()):
            if time.monotonic() >= deadline:
                raise FolderLocked(
                    f"{folder}: in use by {describe(_read_holder(f))}; "
                    f"only one run at a time may use a folder (lock file {path})"
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
