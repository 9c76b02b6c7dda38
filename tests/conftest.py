"""Shared fixtures: the repository root and the digits dataset taken through download -> split -> shard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before anything imports TensorFlow
# On N xdist workers, each worker's TensorFlow (and the training processes its tests start) splits
# an op over cores/N threads, not over every core: N pools of spinning threads on the same cores
# cost CPU time that no test gets. Inter-op threads stay as they are (a replica's collective waits
# on the other's).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


SEED = 42

# A test that uses one of these needs a server process (`make test-fast` leaves it out) ...
SERVER_FIXTURES = {"s3_server", "prefect_server"}
# ... and one that uses these trains a model first
SLOW_FIXTURES = {"tiny_model"}


# The longest modules (`--durations`), longest first. Under `make test` (xdist, a module to a
# worker, `--no-loadscope-reorder`) they start first, so that no long module is left to run alone
# at the end while the other worker idles; the rest follow in collection order.
LONGEST_FIRST = (
    "tests/training/test_distributed.py",
    "tests/test_deployment.py",
    "tests/test_end_to_end.py",
    "tests/test_gate_with_models.py",
    "tests/models/test_resnet.py",
    "tests/training/test_finetune.py",
    "tests/training/test_benchmarks.py",
    "tests/training/test_init.py",
    "tests/test_export_predict.py",
    "tests/exports/test_exports.py",
    "tests/training/test_trainer.py",
    "tests/test_secrets.py",
    "tests/test_packaging.py",
    "tests/models/test_summary_and_benchmark.py",
)


def pytest_collection_modifyitems(config, items):
    """Mark `server` and `slow` from the fixtures a test uses (the `s3` registry parameter gets its
    server through `request.getfixturevalue`, so its mark counts too); the longest modules first."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVER_FIXTURES or item.get_closest_marker("s3"):
            item.add_marker(pytest.mark.server)
        if fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """Paths of a data folder holding the embedded digits: raw PNGs, manifest, labels and shards.

    Built once per session with the default configs and seed 42. Tests must not modify it; those
    that alter data work on their own copy.
    """
    from resnet_pipeline.config import Config
    from resnet_pipeline.data.download import download
    from resnet_pipeline.data.shard import shard
    from resnet_pipeline.data.split import split
    from resnet_pipeline.paths import Paths

    cfg = Config()
    paths = Paths.from_config(cfg, root=tmp_path_factory.mktemp("digits"))
    image_folder = download(cfg.download, paths.raw)
    split(cfg.split, SEED, image_folder, paths.manifest, paths.labels)
    shard(cfg.shard, paths.manifest, paths.raw, paths.shards)
    return paths


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server on loopback (tests/s3server.py), shared by the session.

    Tests that need a clean bucket call `s3_server.make_bucket(<unique name>)`; use
    `s3_server.client()` for a boto3 client. Do not stop or restart it: tests that need that
    start their own `SeaweedS3`.
    """
    from tests.s3server import SeaweedS3

    yield from _running(SeaweedS3(tmp_path_factory.mktemp("seaweed-s3")))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A `prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite),
    shared by the session (tests/prefectserver.py; under `make test`, by the tests of one xdist
    worker): the deployments, the flow runs and the register retry all talk to it.
    `prefect_server.env` is a client's environment (PREFECT_API_URL, PREFECT_HOME). Do not stop it."""
    from tests.prefectserver import PrefectServer

    yield from _running(PrefectServer(tmp_path_factory.mktemp("prefect-home")))


def _running(server):
    """A session server's fixture body: started, handed to the tests, stopped at the end."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model(digits_data, tmp_path_factory):
    """Version 1 of `digits` in a local registry: a ResNet-20 trained 20 steps, with its SavedModel
    (tests/tiny_model.py); shared by the serving and packaging tests."""
    from tests.tiny_model import make_tiny_model

    return make_tiny_model(digits_data, tmp_path_factory.mktemp("tiny-model"))
