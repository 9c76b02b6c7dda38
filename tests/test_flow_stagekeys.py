"""Stage keys recorded inside the data stages' outputs, the checks that use them, and the folder
lock, on a small generated image folder (no TensorFlow, no Prefect)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from resnet_pipeline import cli, stages
from resnet_pipeline import config as config_mod
from resnet_pipeline.paths import Paths
from resnet_pipeline.runlock import LOCK_FILE, FolderLocked, folder_lock
from resnet_pipeline.stagekeys import DATA_STAGES, StaleDataError, is_current, recorded, require_current, stage_key
from tests.data.test_data_stages import small_image_folder
from tests.project import copy_project

REPO = Path(__file__).resolve().parents[1]


def _cfg(folder: Path, **overrides):
    return config_mod.load(
        REPO / "params.yaml",
        {"download.dataset": "imagefolder", "download.path": str(folder), "shard.workers": 1, **overrides},
    )


@pytest.fixture()
def made(tmp_path):
    """A folder after download, split and shard of a generated 2-class image folder."""
    folder = small_image_folder(tmp_path / "src", per_class=10)
    cfg = _cfg(folder)
    paths = Paths.from_config(cfg, tmp_path / "run")
    for stage in DATA_STAGES:
        stages.run_stage(stage, cfg, paths)
    return cfg, paths, folder


def test_each_data_stage_records_its_key_and_params_inside_its_output(made):
    cfg, paths, _ = made
    for stage in DATA_STAGES:
        found = recorded(stage, cfg, paths)
        assert found["key"] == stage_key(stage, cfg, paths.root), stage
        assert is_current(stage, cfg, paths)
    assert (
        json.loads((paths.raw / "imagefolder/.complete").read_text())["params"]["download"]["dataset"] == "imagefolder"
    )
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(paths.manifest).metadata[b"resnet_pipeline.stage"])
    assert meta["params"]["split"]["train"] == cfg.split.train and meta["params"]["base.seed"] == 42
    index = json.loads((paths.shards / "index.json").read_text())
    assert index["stage_key"].startswith("shard-") and index["params"]["shard.jpeg_quality"] == 90
    assert pq.read_table(paths.manifest).num_rows == 20  # the table itself is unchanged by the metadata


def test_other_inputs_make_other_keys_and_only_the_changed_stages_are_stale(made):
    cfg, paths, folder = made
    other = _cfg(folder, **{"split.train": 0.6, "split.val": 0.2, "split.test": 0.2})
    assert [is_current(s, other, paths) for s in DATA_STAGES] == [True, False, False]
    assert stage_key("shard", other, paths.root) != stage_key("shard", cfg, paths.root)  # through split's key
    workers = _cfg(folder, **{"shard.workers": 2})  # not a dvc.yaml param of shard: same shards
    assert all(is_current(s, workers, paths) for s in DATA_STAGES)
    with pytest.raises(StaleDataError, match=r"manifest\.parquet: made by split with key split-"):
        require_current(("split", "shard"), other, paths)
    with pytest.raises(StaleDataError, match=r"manifest\.parquet"):
        stages.run_stage("shard", other, paths)  # shard refuses a manifest of other params
    stages.run_stage("split", other, paths)
    stages.run_stage("shard", other, paths)
    assert all(is_current(s, other, paths) for s in DATA_STAGES)
    assert not is_current("shard", cfg, paths)


def test_edited_or_broken_records_are_not_current(made):
    cfg, paths, _ = made
    labels = paths.labels.read_text()
    paths.labels.write_text(json.dumps({"classes": ["dog", "cat"]}))  # not the labels written with the manifest
    assert not is_current("split", cfg, paths)
    paths.labels.write_text(labels)
    assert is_current("split", cfg, paths)
    index = json.loads((paths.shards / "index.json").read_text())
    (paths.shards / "index.json").write_text(json.dumps({**index, "stage_key": "shard-" + "0" * 64}))
    with pytest.raises(StaleDataError, match=r"index\.json: made by shard with key shard-0000"):
        require_current(("shard",), cfg, paths)
    (paths.shards / "index.json").write_text("{not json")
    assert recorded("shard", cfg, paths) is None and not is_current("shard", cfg, paths)


def test_a_code_change_changes_the_keys_of_the_stages_that_list_it(tmp_path):
    project = copy_project(tmp_path, ["dvc.yaml", "resnet_pipeline"])
    cfg = config_mod.Config()
    before = {s: stage_key(s, cfg, project) for s in (*DATA_STAGES, "train")}
    shard_py = project / "resnet_pipeline/data/shard.py"
    shard_py.write_text(shard_py.read_text() + "\n# changed\n")
    after = {s: stage_key(s, cfg, project) for s in (*DATA_STAGES, "train")}
    assert [before[s] == after[s] for s in (*DATA_STAGES, "train")] == [True, True, False, False]


def test_dvc_yaml_param_lists_name_keys_that_exist():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for item in spec.get("params", []):
            node = params
            for part in (item if isinstance(item, str) else next(iter(item))).split("."):
                assert part in node, f"dvc.yaml stage {name}: param {item} is not in params.yaml"
                node = node[part]


# --------------------------------------------------------------------------- the folder lock

HOLD = """
import sys, time
from resnet_pipeline.runlock import folder_lock
with folder_lock(sys.argv[1], {"flow_run_name": "holder-run", "flow_run_id": "1234"}):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_fails_at_once_naming_the_holder_and_takes_over_after_it_dies(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(FolderLocked, match=rf"in use by holder-run \(flow run 1234\), pid {proc.pid}"):
            with folder_lock(tmp_path, {"flow_run_name": "second"}):
                pass
        assert time.monotonic() - start < 2
        with pytest.raises(FolderLocked, match="holder-run"):  # waiting gives up after `wait`
            with folder_lock(tmp_path, wait=1.5, poll=0.2):
                pass
        assert time.monotonic() - start >= 1.5
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # dies holding the lock: the kernel drops the flock
        proc.wait()
    with caplog.at_level("WARNING", logger="resnet_pipeline.runlock"):
        with folder_lock(tmp_path, {"flow_run_name": "third"}) as holder:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["flow_run_name"] == "third"
            assert holder["pid"] == os.getpid()
    assert f"taking over the lock of holder-run (flow run 1234), pid {proc.pid}" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over next time


def test_stage_commands_hold_the_lock_and_refuse_a_held_folder(made, monkeypatch, capsys):
    cfg, paths, folder = made
    (paths.root / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    monkeypatch.chdir(paths.root)
    proc = _holder(paths.root)
    try:
        assert cli.main(["split"]) == 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "in use by holder-run (flow run 1234)" in capsys.readouterr().err
    assert cli.main(["split"]) == 0  # free again


# --------------------------------------------------------------------------- provenance


def test_provenance_takes_each_stages_params_from_its_own_record(made):
    from resnet_pipeline.fileio import sha256_file
    from resnet_pipeline.provenance import assemble, params_yaml

    cfg, paths, folder = made
    trained = _cfg(folder, **{"train.lr": 0.05, "register.min_improvement": 0.0})
    paths.model_dir.mkdir(parents=True)
    (paths.model_dir / "params.yaml").write_text(trained.to_yaml())
    index = json.loads((paths.shards / "index.json").read_text())
    (paths.model_dir / "train.json").write_text(
        json.dumps(
            {"data": {"index_sha256": sha256_file(paths.shards / "index.json"), "shard_key": index["stage_key"]}}
        )
    )
    now = _cfg(folder, **{"train.lr": 0.2, "register.min_improvement": 0.01, "shard.workers": 3})
    record = assemble(now, paths)
    assert record["params"]["train"]["lr"] == 0.05  # what train ran with, not this run's params
    assert record["params"]["register"]["min_improvement"] == 0.01  # register runs now
    assert record["params"]["shard"]["workers"] == 3  # read by no stage: this run's value
    assert record["data"]["stage_keys"] == {s: stage_key(s, cfg, paths.root) for s in DATA_STAGES}
    assert record["data"]["manifest_sha256"] == sha256_file(paths.manifest)
    assert record["stages"]["train"]["key"] == stage_key("train", trained, paths.root)
    written = paths.root / "version-params.yaml"
    written.write_text(params_yaml(record["params"]))
    assert config_mod.load(written).train.lr == 0.05  # loadable like params.yaml (predict reads it)

    stages.run_stage("shard", _cfg(folder, **{"shard.jpeg_quality": 80}), paths)  # other shards after training
    with pytest.raises(StaleDataError, match=r"train\.json: the model was trained on shards shard-"):
        assemble(now, paths)
