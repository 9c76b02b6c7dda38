"""Concurrent registrations (8 threads, 32 spawned processes) get distinct numbers 1..N, all intact;
8 racing promotions (processes) have one winner and leave 8 history records."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from resnet_pipeline.registry import open_registry
from tests.registry.conftest import NAME, make_files

N = 8
PROCESSES = 32


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
        queue.put(
            (
                writer,
                reg.register(NAME, make_files(Path(folder), model_bytes=bytes([writer]) * 50_000), {"writer": writer}),
                None,
            )
        )
    except BaseException as err:  # noqa: BLE001 - sent back to the test
        queue.put((writer, None, repr(err)))


@pytest.mark.slow
@pytest.mark.s3
def test_32_processes_registering_at_once_get_versions_1_to_32(s3_location, tmp_path):
    # a fresh server interpreter that imports boto3 and the registry once, then forks each writer:
    # 32 separate processes sharing nothing but the S3 server, without 32 imports of boto3
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["boto3", "resnet_pipeline.registry", "tests.registry.conftest"])
    barrier, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_register_in_process, args=(s3_location, str(tmp_path / f"src{i}"), i, barrier, queue))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=300) for _ in range(PROCESSES)]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, _, err in outcomes if err] == []
    writers = {version: writer for writer, version, _ in outcomes}
    assert sorted(writers) == list(range(1, PROCESSES + 1))
    reg = open_registry(s3_location)
    assert reg.versions(NAME) == list(range(1, PROCESSES + 1))
    _pull_all(reg, tmp_path, writers)


def _promote_in_process(location: str, version: int, barrier, queue) -> None:
    from resnet_pipeline.registry import RegistryError

    try:
        reg = open_registry(location, max_attempts=3)
        state = reg.alias(NAME, "champion")  # all read "no champion yet" ...
        barrier.wait(timeout=120)  # ... before any writes
        reg.promote(NAME, version, "champion", expected=state)
        queue.put((version, "won"))
    except RegistryError as err:
        queue.put((version, str(err)))
    except BaseException as err:  # noqa: BLE001 - sent back to the test
        queue.put((version, f"crashed: {err!r}"))


@pytest.mark.slow
@pytest.mark.s3
def test_8_racing_promotions_have_one_winner_and_8_history_records(s3_location, tmp_path):
    reg = open_registry(s3_location)
    files = make_files(tmp_path / "src")
    versions = [reg.register(NAME, files, {}) for _ in range(N)]
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=(s3_location, v, barrier, queue)) for v in versions]
    for p in procs:
        p.start()
    outcomes = dict(queue.get(timeout=300) for _ in range(N))
    for p in procs:
        p.join(timeout=60)
    winners = [v for v, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    (winner,) = winners
    for version, outcome in outcomes.items():
        if version != winner:
            assert f"promoting version {version} lost the race" in outcome and f"version {winner}" in outcome, outcome
    assert reg.alias(NAME, "champion").version == winner
    history = reg.history(NAME, "champion")
    assert len(history) == N
    assert sorted((h["outcome"], h["version"]) for h in history) == sorted(
        ("won" if v == winner else "lost", v) for v in versions
    )
