"""DVC's record of a run (resnet_pipeline/dvcrecord.py) and the refusals of `registry restore`, on a
small DVC project holding the session's digits data: no server, no training.

The flow run, the push and the restores themselves are in tests/test_end_to_end.py (a local remote)
and tests/test_deployment.py (a deployment, the remote on SeaweedFS)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from resnet_pipeline import config as config_mod
from resnet_pipeline.dvcrecord import (
    DvcStateError,
    open_repo,
    project_root,
    publish,
    record_stage,
    run_params,
    stale_in_lock,
)
from resnet_pipeline.paths import Paths
from resnet_pipeline.restore import RestoreError, params_for, restore
from tests.project import copy_project

DATA_STAGES = ("download", "split", "shard")


def test_run_params_keep_dvcs_reading_and_take_the_runs_values_where_they_differ():
    read = {"base.data_dir": "data", "train": {"lr": 0.1, "epochs": 30}, "evaluate.top_k": 3}
    in_file = {"base": {"data_dir": "data"}, "train": {"lr": 0.1, "epochs": 30, "depth": 20}, "evaluate": {"top_k": 3}}
    same, differ = run_params(read, in_file, in_file)
    assert (same, differ) == (read, [])  # nothing overridden: exactly what DVC read from params.yaml
    run = {**in_file, "train": {**in_file["train"], "epochs": 2, "depth": 32}, "evaluate": {"top_k": 5}}
    values, differ = run_params(read, run, in_file)
    # a group keeps params.yaml's keys and takes the run's value of each key that differs
    assert values == {"base.data_dir": "data", "train": {"lr": 0.1, "epochs": 2, "depth": 32}, "evaluate.top_k": 5}
    assert sorted(differ) == ["evaluate.top_k", "train.depth", "train.epochs"]
    assert run_params(read, run, None)[0]["train"] == run["train"]  # params.yaml does not load: the run's


def test_a_bare_folder_is_no_dvc_project_and_one_line_says_so(tmp_path: Path, caplog):
    cfg = config_mod.Config()
    with caplog.at_level(logging.INFO, logger="resnet_pipeline.dvcrecord"):
        assert project_root(Paths.from_config(cfg, tmp_path)) is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "is not a DVC project" in line and "no dvc.lock written, nothing pushed" in line
    copy_project(tmp_path, ["dvc.yaml", ".dvc/config"])
    moved = config_mod.Config(base=config_mod.BaseConfig(data_dir="elsewhere"))
    assert project_root(Paths.from_config(moved, tmp_path)) is None  # outputs away from dvc.yaml's data/
    assert project_root(Paths.from_config(cfg, tmp_path)) == tmp_path.resolve()


@pytest.fixture
def project(tmp_path: Path, digits_data) -> Path:
    """A git + DVC copy of the project with the digits' raw images, manifest, labels and shards."""
    root = copy_project(
        tmp_path / "project", ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
    )
    shutil.copytree(Path(__file__).resolve().parents[1] / "resnet_pipeline", root / "resnet_pipeline")
    shutil.copytree(digits_data.data, root / "data", ignore=shutil.ignore_patterns("downloads"))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
    return root


def test_recorded_data_stages_are_what_dvc_status_calls_up_to_date(project: Path, caplog):
    cfg = config_mod.load(project / "params.yaml")
    for stage in DATA_STAGES:
        record_stage(project, stage, cfg)
    with open_repo(project) as repo:
        assert repo.status(targets=[f"{project}/dvc.yaml:{s}" for s in DATA_STAGES]) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["shard"]["params"]["params.yaml"]["shard.target_shard_mb"] == 64
    assert {o["path"] for o in lock["download"]["outs"]} == {"data/raw"}

    # a run with an override records the value it ran with; `dvc status` then lists it, nothing else
    with caplog.at_level(logging.INFO, logger="resnet_pipeline.dvcrecord"):
        record_stage(project, "shard", config_mod.load(project / "params.yaml", {"shard.target_shard_mb": 32}))
    assert "shard recorded with this run's shard.target_shard_mb, not params.yaml's" in caplog.text
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["shard"]["params"]["params.yaml"]["shard.target_shard_mb"] == 32
    with open_repo(project) as repo:
        status = repo.status(targets=[f"{project}/dvc.yaml:{s}" for s in DATA_STAGES])
    (stage, report), *others = status.items()  # DVC names the stage relative to the current folder
    assert not others and stage.endswith("shard")
    assert report == [{"changed deps": {"params.yaml": {"shard.target_shard_mb": "modified"}}}]

    # an upstream output that changed while its inputs did not: its stage key says nothing, DVC does
    assert stale_in_lock(project, "split") is None and stale_in_lock(project, "train") is None  # not recorded
    extra = next((project / "data/raw").rglob("*.png"))
    extra.with_name("copy.png").write_bytes(extra.read_bytes())
    assert "data/raw" in str(stale_in_lock(project, "split"))

    # nothing is registered on a dvc.lock that does not record the workspace: here, no model at all
    stale = r"does not record the outputs in the workspace: download: data/raw modified; .*train: .*dvc commit"
    with pytest.raises(DvcStateError, match=stale):
        publish(project, cfg)


def test_restore_refuses_a_version_without_dvc_lock_or_into_a_full_folder(tmp_path: Path):
    from resnet_pipeline.registry import open_registry

    reg = open_registry(tmp_path / "registry")
    (tmp_path / "model.keras").write_bytes(b"not a model")
    reg.register("plain", {"model.keras": tmp_path / "model.keras"}, {"git_commit": "0" * 40})
    with pytest.raises(RestoreError, match=r"model plain:1: the version has no dvc.lock"):
        restore(reg, "plain:1", tmp_path / "restored")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    reg.register("locked", {"model.keras": tmp_path / "model.keras", "dvc.lock": tmp_path / "dvc.lock"}, {})
    with pytest.raises(RestoreError, match=r"model locked:1: the version records no git commit"):
        restore(reg, "locked", tmp_path / "restored")
    reg.register("full", {"dvc.lock": tmp_path / "dvc.lock"}, {"git_commit": "0" * 40})
    with pytest.raises(RestoreError, match=r"exists and is not an empty folder"):
        restore(reg, "full", tmp_path)
    assert not (tmp_path / "restored").exists()


def test_restored_params_are_the_versions_with_the_values_dvc_lock_records():
    version = {"train": {"lr": 0.1, "epochs": 1}, "register": {"min_improvement": 0.0}, "dvc": {"push": True}}
    lock = {
        "stages": {
            "train": {"params": {"params.yaml": {"train": {"lr": 0.1, "epochs": 1}}}},
            "register": {"params": {"params.yaml": {"register": {"min_improvement": 0.5}}}},  # an older run's
        }
    }
    assert params_for(version, lock) == version  # register's entry is rewritten by the restore itself
    lock["stages"]["evaluate"] = {"params": {"params.yaml": {"evaluate.top_k": 5}}}
    assert params_for(version, lock)["evaluate"] == {"top_k": 5}


def test_benchmark_dvc_smoke(tmp_path: Path):
    """`resnet-pipeline benchmark dvc --data-only` on a few JPEGs: every figure there, a second push
    sends nothing, and the DVC project is clean after it."""
    from resnet_pipeline.benchmark.dvccost import format_result, run

    result = run(60, 2, digits=False, data_only=True, work_dir=tmp_path)
    (row,) = result["datasets"]
    assert set(row["bare"]["stage"]) == set(row["dvc"]["record"]) == set(DATA_STAGES)
    first, raw, again = row["dvc"]["push"]
    assert first["files"] >= 4 and raw["files"] >= 60 and again["files"] == 0
    assert row["dvc"]["status"]["clean"]
    text = format_result(result)
    assert "push of everything again (a second run): 0 files" in text and "DVC adds" in text
