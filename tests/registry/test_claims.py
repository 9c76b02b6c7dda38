"""Registrations against gc, lost responses, retries and stores that ignore conditional writes.

The faults here cannot be caused on a real server at a chosen moment, so each uses a small storage
wrapper (a test double, named in its docstring) around the real backend: uploads slowed down, a
process frozen, a response lost after the write succeeded, conditional headers dropped.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from resnet_pipeline.registry import CLAIM, HEARTBEAT, MANIFEST, Registry, RegistryError, claims, open_registry
from resnet_pipeline.registry.storage import Conflict
from tests.registry.conftest import NAME, make_files, make_run


class _Wrapper:
    def __init__(self, inner):
        self.inner, self.location = inner, inner.location

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _SlowUploads(_Wrapper):
    """Test double for a slow link: every file upload takes `delay` seconds more."""

    def __init__(self, inner, delay: float):
        super().__init__(inner)
        self.delay = delay

    def upload_file(self, key, path):
        time.sleep(self.delay)
        return self.inner.upload_file(key, path)


class _Frozen(_Wrapper):
    """Test double for a process frozen mid-upload (SIGSTOP, a suspended laptop): from the second file
    on, uploads wait for `release` and heartbeats are not sent meanwhile."""

    def __init__(self, inner):
        super().__init__(inner)
        self.release, self.frozen, self.uploads = threading.Event(), threading.Event(), 0

    def upload_file(self, key, path):
        self.uploads += 1
        if self.uploads == 2:
            self.frozen.set()
            self.release.wait(60)
            self.frozen.clear()
        return self.inner.upload_file(key, path)

    def put(self, key, data, **kw):
        if key.endswith("/" + HEARTBEAT) and self.frozen.is_set():
            return "frozen"
        return self.inner.put(key, data, **kw)


def _complete_versions(reg) -> dict[int, bool]:
    """Every listed version -> whether each file its manifest lists is there with its size."""
    out = {}
    for version in reg.versions(NAME):
        files = reg.manifest(f"{NAME}:{version}")["files"]
        out[version] = all(
            (info := reg.storage.head(f"models/{NAME}/versions/{version}/{t}")) is not None and info.size == e["bytes"]
            for t, e in files.items()
        )
    return out


def test_gc_beside_a_slow_registration_never_leaves_a_version_with_missing_files(location, tmp_path):
    age = 2.5  # seconds; S3 LastModified has 1 s resolution
    slow = Registry(_SlowUploads(open_registry(location).storage, delay=1.0), heartbeat_seconds=0.3)
    files = make_files(tmp_path / "src")  # 4 files: 4 s of upload, well past gc's age
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(version=slow.register(NAME, files, {"slow": True})))
    worker.start()
    collector, seen, removed = open_registry(location), [], []
    while worker.is_alive():
        removed += collector.gc(NAME, older_than=age)
        seen.append(_complete_versions(collector))
        time.sleep(0.2)
    worker.join()
    assert result["version"] == 1 and removed == []
    assert all(all(state.values()) for state in seen), seen  # never listed with a file missing
    assert _complete_versions(collector) == {1: True}
    collector.pull(f"{NAME}:1", tmp_path / "pulled")


def test_a_registration_frozen_past_gc_age_is_collected_and_then_refuses_to_commit(tmp_path):
    inner = open_registry(tmp_path / "registry").storage
    frozen = _Frozen(inner)
    reg = Registry(frozen, heartbeat_seconds=0.1)
    files = make_files(tmp_path / "src")
    outcome: dict = {}

    def register():
        try:
            outcome["version"] = reg.register(NAME, files, {})
        except RegistryError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=register)
    worker.start()
    assert frozen.frozen.wait(30)
    collector = open_registry(tmp_path / "registry")
    removed = []
    deadline = time.monotonic() + 30
    while not removed and time.monotonic() < deadline:
        time.sleep(0.3)
        removed = collector.gc(NAME, older_than=1.0)
    assert [r["version"] for r in removed] == [1]
    frozen.release.set()
    worker.join(60)
    assert "no longer holds its claim" in outcome.get("error", ""), outcome
    assert collector.versions(NAME) == []
    # what it uploaded after the collection is an abandoned leftover: collected once old enough
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, seconds=1)  # a clock a day ahead
    assert collector.gc(NAME) == []  # the default age is a day
    assert [r["version"] for r in collector.gc(NAME, now=later)] == [1]
    assert collector.storage.list(f"models/{NAME}/versions/") == []


def test_gc_cleans_a_stale_abandoned_claim_and_keeps_committed_versions(location, tmp_path):
    reg = open_registry(location)
    reg.register(NAME, make_files(tmp_path / "src"), {})
    reg.storage.put(f"models/{NAME}/versions/2/{CLAIM}", b'{"token": "crashed-run-token"}')
    reg.storage.put(f"models/{NAME}/versions/2/model.keras", b"half a model")
    now = dt.datetime.now(dt.UTC)
    assert reg.gc(now=now + dt.timedelta(hours=23)) == []
    removed = reg.gc(now=now + dt.timedelta(days=1, minutes=1))
    assert [(r["version"], sorted(r["objects"])) for r in removed] == [(2, [f"2/{CLAIM}", "2/model.keras"])]
    assert reg.versions(NAME) == [1]


class _LostResponse(_Wrapper):
    """Test double for a lost response: the manifest PUT reaches the store, then the client sees a
    failure (`error`: a connection reset, or the 412 a botocore retry of the same PUT gets)."""

    def __init__(self, inner, error: Exception):
        super().__init__(inner)
        self.error, self.fired = error, False

    def put(self, key, data, **kw):
        etag = self.inner.put(key, data, **kw)
        if key.endswith("/" + MANIFEST) and not self.fired:
            self.fired = True
            raise self.error
        return etag


@pytest.mark.parametrize(
    "error",
    [RegistryError("connection reset by peer"), Conflict("manifest.json")],
    ids=["connection-reset", "retry-got-412"],
)
def test_a_commit_whose_response_was_lost_is_one_registered_version(location, tmp_path, error):
    storage = _LostResponse(open_registry(location).storage, error)
    reg = Registry(storage)
    assert reg.register(NAME, make_files(tmp_path / "src"), {"run": 1}) == 1
    assert storage.fired
    assert open_registry(location).versions(NAME) == [1]


class _CrashOnce(_Wrapper):
    """Test double for a crash mid-register: the first upload of `file` raises, as a killed process
    would stop there; a second attempt goes through."""

    def __init__(self, inner, file: str):
        super().__init__(inner)
        self.file, self.crashed = file, False

    def upload_file(self, key, path):
        if key.endswith("/" + self.file) and not self.crashed:
            self.crashed = True
            raise RegistryError(f"{key}: connection lost (test double)")
        return self.inner.upload_file(key, path)


def test_a_retried_register_stage_after_a_crash_gives_one_version(location, tmp_path):
    from resnet_pipeline.registry import register_model

    run = make_run(tmp_path / "run", top1=0.9)
    reg = Registry(_CrashOnce(open_registry(location).storage, "metrics.json"))
    with pytest.raises(RegistryError, match="connection lost"):
        register_model(reg, NAME, run["model_dir"], run["eval_dir"], run["out"], data_manifest=run["data_manifest"])
    record = register_model(
        reg, NAME, run["model_dir"], run["eval_dir"], run["out"], data_manifest=run["data_manifest"]
    )
    assert record["version"] == 1 and record["promotion"]["promoted"]
    again = register_model(reg, NAME, run["model_dir"], run["eval_dir"], run["out"], data_manifest=run["data_manifest"])
    assert again["version"] == 1 and again["promotion"]["promoted"] and again["gate"] == record["gate"]
    fresh = open_registry(location)
    assert fresh.versions(NAME) == [1] and fresh.alias(NAME, "champion").version == 1
    assert len(fresh.history(NAME, "champion")) == 1


def test_a_prefect_retry_of_register_after_a_crash_gives_one_version(tmp_path, monkeypatch, prefect_server):
    """The register stage function as a Prefect task with the flow's own register retries, retried by
    Prefect after a crash in its first attempt (the flow's task also checks the data stages' records,
    which this stand-in run has none of); on the session's Prefect server."""
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.pipeline as pipeline
    from resnet_pipeline.registry import register_model
    from resnet_pipeline.registry import storage as storage_mod

    run = make_run(tmp_path / "run", top1=0.9)
    real_upload, crashed = storage_mod.LocalStorage.upload_file, []

    def crash_once(self, key, path):  # test double for a crash mid-register
        if key.endswith("/metrics.json") and not crashed:
            crashed.append(key)
            raise RegistryError(f"{key}: connection lost (test double)")
        return real_upload(self, key, path)

    monkeypatch.setattr(storage_mod.LocalStorage, "upload_file", crash_once)
    assert pipeline.register.retries >= 1

    @task(retries=pipeline.register.retries, retry_delay_seconds=0, persist_result=False)
    def register():
        record = register_model(
            str(tmp_path / "registry"),
            NAME,
            run["model_dir"],
            run["eval_dir"],
            run["out"],
            data_manifest=run["data_manifest"],
        )
        return record["version"]

    @flow(persist_result=False)
    def register_only():
        return register()

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.base}):
        assert register_only() == 1
    assert crashed and open_registry(tmp_path / "registry").versions(NAME) == [1]


class _DropsConditions(_Wrapper):
    """Test double for an S3-compatible store that ignores If-None-Match and If-Match (no test
    server behaves so): every conditional PUT is written unconditionally."""

    def put(self, key, data, *, if_none_match=False, if_match=None):
        return self.inner.put(key, data)


def test_a_store_that_ignores_conditional_writes_is_refused_unless_allowed(location, tmp_path, caplog):
    storage = _DropsConditions(open_registry(location).storage)
    storage.location = location + "#unsafe"  # its own probe cache entry
    files = make_files(tmp_path / "src")
    with pytest.raises(RegistryError) as err:
        Registry(storage).register(NAME, files, {})
    message = str(err.value)
    assert location in message and "If-None-Match" in message and "allow_unsafe_store" in message
    assert open_registry(location).storage.list(f"models/{NAME}/") == []  # nothing claimed
    assert Registry(storage, allow_unsafe_store=True).register(NAME, files, {}) == 1
    assert "allow_unsafe_store is true" in caplog.text


def test_the_probe_passes_on_the_real_backends(location):
    assert claims.probe(open_registry(location).storage) == []
    assert open_registry(location).storage.list("_probe/") == []


def test_a_local_registry_without_hard_links_says_so(tmp_path, monkeypatch):
    """Test double for a filesystem without link(2) (SMB, some FUSE mounts): os.link raises EPERM."""
    import errno
    import os

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    reg = open_registry(tmp_path / "nolinks")
    with pytest.raises(RegistryError, match="does not support hard links"):
        reg.register(NAME, make_files(tmp_path / "src"), {})
