"""The folder lock of a stage command when `TF_CONFIG` is set: a launcher's workers run under the
launcher's lock only on its token; anything else takes the lock as any stage does (the members of
one cluster sharing a folder on one host run under the lock of the first of them).

In process, no TensorFlow: `stages.stage_lock` is entered with the environment a worker would have.
"""

from __future__ import annotations

import json
import os

import pytest

from resnet_pipeline import runlock, stages
from resnet_pipeline.paths import Paths
from resnet_pipeline.runlock import LOCK_FILE, FolderLocked, folder_lock
from resnet_pipeline.training.launch import tf_config

PORTS = [23456, 23457]
RUN_TOKEN_ENV = "RESNET_PIPELINE_RUN_TOKEN"  # what `train --workers` gives its workers


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Paths:
    monkeypatch.delenv(RUN_TOKEN_ENV, raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    return Paths(tmp_path, tmp_path / "data", tmp_path / "artifacts")


def _record(paths: Paths) -> dict:
    return json.loads((paths.root / LOCK_FILE).read_text())


def _held(paths: Paths) -> bool:
    try:
        with folder_lock(paths.root):
            return False
    except FolderLocked:
        return True


def test_a_stage_with_tf_config_but_no_launcher_token_takes_the_lock(paths, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config(PORTS, 1))
    for command in ("shard", "train"):
        with stages.stage_lock(command, paths):
            record = _record(paths)
            assert (record["pid"], record["command"]) == (os.getpid(), f"resnet-pipeline {command}")
            with pytest.raises(FolderLocked, match=f"in use by resnet-pipeline {command}, pid {os.getpid()}"):
                with folder_lock(paths.root):
                    pass
        assert not _held(paths)


def test_a_worker_runs_under_its_launchers_lock_only_with_the_launchers_token(paths, monkeypatch):
    token, owner = runlock.new_run_token()
    assert token not in json.dumps(owner), "the lock file records a digest of the token, not the token"
    monkeypatch.setenv("TF_CONFIG", tf_config(PORTS, 1))
    with folder_lock(paths.root, {"command": "resnet-pipeline train --workers 2", **owner}):
        launchers = (paths.root / LOCK_FILE).read_text()
        monkeypatch.setenv(RUN_TOKEN_ENV, token)
        with stages.stage_lock("train", paths):
            assert (paths.root / LOCK_FILE).read_text() == launchers
        assert _held(paths) and (paths.root / LOCK_FILE).read_text() == launchers

        with pytest.raises(FolderLocked, match=f"in use by resnet-pipeline train --workers 2, pid {os.getpid()}"):
            with stages.stage_lock("shard", paths):  # the token speaks for the launcher's workers only
                pass
        monkeypatch.setenv(RUN_TOKEN_ENV, runlock.new_run_token()[0])  # another launcher's token
        with pytest.raises(FolderLocked, match="in use by resnet-pipeline train --workers 2"):
            with stages.stage_lock("train", paths):
                pass

    monkeypatch.setenv(RUN_TOKEN_ENV, token)  # its launcher has released the folder
    with pytest.raises(RuntimeError, match=f"{RUN_TOKEN_ENV} is set, but no launcher holds"):
        with stages.stage_lock("train", paths):
            pass
    assert not _held(paths)


def test_members_of_one_cluster_share_a_folder_and_nothing_else_does(paths, monkeypatch):
    """Chief and worker started by hand with TF_CONFIG in one folder: the second runs under the
    first's lock instead of failing (which would leave the first waiting for it)."""
    monkeypatch.setenv("TF_CONFIG", tf_config(PORTS, 0))
    with stages.stage_lock("train", paths):
        monkeypatch.setenv("TF_CONFIG", tf_config(PORTS, 1))
        with stages.stage_lock("train", paths):
            assert _record(paths)["task"] == "worker0"
        for command, config in (
            ("shard", tf_config(PORTS, 1)),  # a stage is not a member of the cluster
            ("train", tf_config(PORTS, 0)),  # the same task twice
            ("train", tf_config([PORTS[0], PORTS[1] + 1], 1)),  # another cluster
        ):
            monkeypatch.setenv("TF_CONFIG", config)
            with pytest.raises(FolderLocked, match=f"in use by resnet-pipeline train, pid {os.getpid()}"):
                with stages.stage_lock(command, paths):
                    pass
    assert not _held(paths)
