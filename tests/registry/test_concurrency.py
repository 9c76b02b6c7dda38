"""Concurrent registrations (threads and spawned processes) get distinct numbers 1..N, all intact."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from resnet_pipeline.registry import open_registry
from tests.registry.conftest import NAME, make_files

N = 8


def _pull_all(reg, tmp_path: Path, writers: dict[int, int]) -> None:
    for version, writer in writers.items():
        dest = reg.pull(f"{NAME}:{version}", tmp_path / "pulled" / str(version))  # verifies every sha256
        assert (dest / "model.keras").read_bytes() == bytes([writer]) * 50_000
        assert reg.manifest(f"{NAME}:{version}")["writer"] == writer


def test_threads_registering_at_once_get_versions_1_to_8(location, tmp_path):
    sources = {i: make_files(tmp_path / f"src{i}", model_bytes=bytes([i]) * 50_000) for i in range(N)}
    barrier = threading.Barrier(N)
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            reg = open_registry(location, max_attempts=3)
            barrier.wait()
            results[reg.register(NAME, sources[i], {"writer": i})] = i
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(results) == list(range(1, N + 1))
    reg = open_registry(location)
    assert reg.versions(NAME) == list(range(1, N + 1))
    _pull_all(reg, tmp_path, results)


def _register_in_process(location: str, folder: str, writer: int, barrier, queue) -> None:
    try:
        reg = open_registry(location, max_attempts=3)
        barrier.wait(timeout=120)
        queue.put((writer, reg.register(NAME, make_files(Path(folder), model_bytes=bytes([writer]) * 50_000),
                                         {"writer": writer}), None))
    except BaseException as err:  # noqa: BLE001 - sent back to the test
        queue.put((writer, None, repr(err)))


@pytest.mark.s3
def test_processes_registering_at_once_get_versions_1_to_8(s3_location, tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the server
    barrier, queue = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_register_in_process, args=(s3_location, str(tmp_path / f"src{i}"), i, barrier, queue))
             for i in range(N)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=300) for _ in range(N)]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, _, err in outcomes if err] == []
    writers = {version: writer for writer, version, _ in outcomes}
    assert sorted(writers) == list(range(1, N + 1))
    reg = open_registry(s3_location)
    assert reg.versions(NAME) == list(range(1, N + 1))
    _pull_all(reg, tmp_path, writers)
