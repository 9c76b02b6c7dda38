"""End to end on the embedded digits: real `dvc repro`, a real Prefect flow run, DVC remotes.

These run the pipeline with 1-2 training epochs so that they stay fast; `make run` trains the
default 30 epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.project import copy_project

pytestmark = pytest.mark.slow  # dvc repro and a flow run of the whole pipeline

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",
    ".gitignore",
    "resnet_pipeline",
    "flows",
]
STAGES = ("download", "split", "shard", "train", "evaluate", "register")
DATA_STAGES = STAGES[:3]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _ran_stages(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def _write_params(project: Path, **train) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory) -> dict:
    """A git + DVC copy of the project with a 1-epoch params.yaml, reproduced once; with what that
    first `dvc repro` registered (the module's tests rerun stages and register more versions)."""
    project = tmp_path_factory.mktemp("project")
    copy_project(project, PROJECT_FILES)
    # the digits at their own 8x8; deterministic, so that the flow's weights can be compared with these
    _write_params(project, epochs=1, image_size=8, pad_crop=2, deterministic=True)
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], project)
    commit = _run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    proc = _run([str(BIN / "dvc"), "repro"], project, timeout=900)
    assert _ran_stages(proc.stdout) == set(STAGES), proc.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], project)
    versions = project / "registry/models/resnet-digits/versions"
    return {
        "project": project,
        "commit": commit,  # the project before `dvc repro`: no dvc.lock
        "lock": lock,
        "weights": _weights_md5(project),
        "registered": json.loads((project / "artifacts/registered.json").read_text()),
        "versions": sorted(p.name for p in versions.iterdir()),
    }


def _weights_md5(project: Path) -> str:
    """md5 of the weights inside artifacts/model/model.keras. The file itself differs between two runs
    of the same deterministic training: Keras writes the save's date and Python id()s into it."""
    import zipfile

    with zipfile.ZipFile(project / "artifacts/model/model.keras") as keras_file:
        return hashlib.md5(keras_file.read("model.weights.h5")).hexdigest()


@pytest.fixture(scope="module")
def dvc_project(first_repro: dict) -> Path:
    return first_repro["project"]


def test_dvc_repro_writes_every_stage_and_registers_version_1(first_repro: dict, dvc_project: Path):
    assert first_repro["registered"]["version"] == 1
    assert first_repro["versions"] == ["1"]
    versions = dvc_project / "registry/models/resnet-digits/versions"
    manifest = json.loads((versions / "1/manifest.json").read_text())
    files = set(manifest["files"])  # the SavedModel is a folder: its files are listed one by one
    assert {f.split("/")[0] for f in files} == {
        "model.keras",
        "saved_model",
        "params.yaml",
        "labels.json",
        "metrics.json",
        "predictions.parquet",  # per test image, for the paired gate
        "dvc.lock",  # of the run: every stage before register, as `dvc repro` recorded it
    }
    assert manifest["git_commit"] == first_repro["commit"]
    version_lock = yaml.safe_load((versions / "1/dvc.lock").read_text())["stages"]
    assert {s: version_lock[s] for s in STAGES[:-1]} == {s: first_repro["lock"]["stages"][s] for s in STAGES[:-1]}
    # the register stage pushed them to the default remote (.dvc-remote) before registering
    assert manifest["dvc"]["remote"] == {"name": "local", "url": str((dvc_project / ".dvc-remote").resolve())}
    assert manifest["dvc"]["pushed"] > 1797 and manifest["dvc"]["raw"] is True
    assert "saved_model/saved_model.pb" in files
    assert (dvc_project / "artifacts/model/saved_model/saved_model.pb").exists()
    metrics = json.loads((dvc_project / "artifacts/eval/metrics.json").read_text())
    assert (
        metrics["test"]["examples"]
        == json.loads((dvc_project / "data/shards/index.json").read_text())["splits"]["test"]["records"]
    )


def test_dvc_repro_again_runs_nothing_and_train_param_reruns_only_downstream(dvc_project: Path):
    again = _run([str(BIN / "dvc"), "repro"], dvc_project)
    assert _ran_stages(again.stdout) == set(), again.stdout
    versions = dvc_project / "registry/models/resnet-digits/versions"
    before = sorted(int(p.name) for p in versions.iterdir())
    exp = _run([str(BIN / "dvc"), "exp", "run", "-S", "train.epochs=2"], dvc_project, timeout=900)
    assert _ran_stages(exp.stdout) == {"train", "evaluate", "register"}, exp.stdout
    assert sorted(int(p.name) for p in versions.iterdir()) == [*before, before[-1] + 1]
    assert json.loads((dvc_project / "artifacts/model/train.json").read_text())["epochs"] == 2


def test_dvc_exp_run_of_a_register_param_records_it_in_the_new_version(dvc_project: Path):
    exp = _run([str(BIN / "dvc"), "exp", "run", "-S", "register.min_improvement=0.01"], dvc_project, timeout=900)
    assert _ran_stages(exp.stdout) == {"register"}, exp.stdout  # train did not rerun: its params.yaml is older
    versions = dvc_project / "registry/models/resnet-digits/versions"
    newest = versions / str(max(int(p.name) for p in versions.iterdir()))
    manifest = json.loads((newest / "manifest.json").read_text())
    recorded = yaml.safe_load((newest / "params.yaml").read_text())
    assert recorded["register"]["min_improvement"] == manifest["params"]["register"]["min_improvement"] == 0.01
    trained = json.loads((dvc_project / "artifacts/model/train.json").read_text())["epochs"]
    assert recorded["train"]["epochs"] == trained  # what train ran with, from its own record
    assert manifest["stages"]["register"]["params"]["register"]["min_improvement"] == 0.01
    assert set(manifest["data"]["stage_keys"]) == {"download", "split", "shard"}


def _flow(root: Path, prefect_server) -> str:
    """A run of flows/pipeline.py on `root` against the session's server (PREFECT_API_URL), as a
    deployment's run is: no temporary server. Its log."""
    flow = [sys.executable, str(REPO / "flows/pipeline.py"), "--root", str(root)]
    proc = subprocess.run(
        flow, cwd=REPO, env={**_env(), **prefect_server.env}, capture_output=True, text=True, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def _remote_objects(root: Path) -> set[str]:
    """The md5 of every object in the project's default remote, the local folder .dvc-remote."""
    store = root / ".dvc-remote/files/md5"
    return {p.parent.name + p.name for p in store.glob("*/*")} if store.is_dir() else set()


def _stage_md5s(lock: dict, stages) -> set[str]:
    """The md5 of every cached output of these stages in a dvc.lock (a folder: its `.dir` listing)."""
    return {out["md5"] for stage in stages for out in lock["stages"][stage].get("outs", [])}


@pytest.fixture(scope="module")
def flow_run(first_repro: dict, prefect_server, tmp_path_factory) -> dict:
    """One flow run in a fresh clone of the module's project, at its commit before `dvc repro` (no
    dvc.lock, the same params): what it left, before the module's other tests change the folder."""
    root = tmp_path_factory.mktemp("flow") / "project"
    _run(["git", "clone", "-q", str(first_repro["project"]), str(root)], root.parent)
    _run(["git", "checkout", "-q", "--detach", first_repro["commit"]], root)
    assert not (root / "dvc.lock").exists()
    log = _flow(root, prefect_server)
    return {
        "root": root,
        "log": log,
        "lock": yaml.safe_load((root / "dvc.lock").read_text()),
        "weights": _weights_md5(root),
        "registered": json.loads((root / "artifacts/registered.json").read_text()),
        "remote": _remote_objects(root),
    }


def test_prefect_flow_writes_the_same_manifest_and_shards_as_dvc(dvc_project: Path, flow_run: dict):
    root, log = flow_run["root"], flow_run["log"]
    for stage in STAGES:
        if stage != "shard":
            assert f"Task run '{stage}-" in log, log[-3000:]
        assert f"Task run 'dvc-commit-{stage}'" in log, log[-3000:]  # each stage recorded in dvc.lock
    # the shard stage is one task that plans and swaps in, and one task per shard file, mapped
    shard_files = json.loads((dvc_project / "data/shards/index.json").read_text())["shards"]
    assert "Task run 'shard-" in log
    assert log.count("Task run 'write-shard-") >= len(shard_files) >= 3
    assert "Flow run" in log and "Finished in state Completed()" in log
    assert (root / "data/manifest.parquet").read_bytes() == (dvc_project / "data/manifest.parquet").read_bytes()
    dvc_shards = sorted(p.name for p in (dvc_project / "data/shards").iterdir())
    assert dvc_shards == sorted(p.name for p in (root / "data/shards").iterdir())
    for name in dvc_shards:
        assert (root / "data/shards" / name).read_bytes() == (dvc_project / "data/shards" / name).read_bytes(), name
    assert flow_run["registered"]["version"] == 1
    # the flow's version names the same data as dvc repro's: manifest, shard index and stage keys
    flow_version = json.loads((root / "registry/models/resnet-digits/versions/1/manifest.json").read_text())
    dvc_version = json.loads((dvc_project / "registry/models/resnet-digits/versions/1/manifest.json").read_text())
    assert flow_version["data"] == dvc_version["data"]
    assert flow_version["data"]["stage_keys"]["shard"].startswith("shard-")


def _dvc_is_clean(root: Path) -> None:
    status = _run([str(BIN / "dvc"), "status"], root)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    dry = _run([str(BIN / "dvc"), "repro", "--dry"], root)
    assert _ran_stages(dry.stdout) == set(), dry.stdout


def test_a_flow_run_in_a_fresh_clone_leaves_dvc_as_dvc_repro_would(first_repro: dict, flow_run: dict):
    root, lock = flow_run["root"], flow_run["lock"]
    _dvc_is_clean(root)  # up to date: `dvc repro` would run nothing, training included
    for stage in DATA_STAGES:  # the md5s of code, params and outputs that `dvc repro` wrote in the twin folder
        assert lock["stages"][stage] == first_repro["lock"]["stages"][stage], stage
    assert lock["stages"]["train"]["params"] == first_repro["lock"]["stages"]["train"]["params"]
    assert flow_run["weights"] == first_repro["weights"], "train.deterministic: the same weights as dvc repro's"
    # the version carries the run's dvc.lock and commit; its data and model are in the remote
    version = root / "registry/models/resnet-digits/versions/1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["git_commit"] == first_repro["commit"]
    assert manifest["files"]["dvc.lock"]["sha256"] == hashlib.sha256((version / "dvc.lock").read_bytes()).hexdigest()
    version_lock = yaml.safe_load((version / "dvc.lock").read_text())["stages"]
    assert {s: version_lock[s] for s in STAGES[:-1]} == {s: lock["stages"][s] for s in STAGES[:-1]}
    outs = {o["path"]: o["md5"] for stage in STAGES[:-1] for o in lock["stages"][stage].get("outs", [])}
    for path in ("data/manifest.parquet", "data/labels.json", "data/shards", "data/raw", "artifacts/model/model.keras"):
        assert outs[path] in flow_run["remote"], path
    listing = outs["data/shards"]  # a folder's `.dir` object lists its files
    shards = json.loads((root / ".dvc-remote/files/md5" / listing[:2] / listing[2:]).read_text())
    assert {e["md5"] for e in shards} <= flow_run["remote"] and len(shards) >= 4  # three shards and the index


def test_a_flow_run_with_train_lr_changed_pushes_no_data_and_one_with_the_same_inputs_pushes_nothing(
    flow_run: dict, prefect_server
):
    root = flow_run["root"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 0.05
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _remote_objects(root)
    _flow(root, prefect_server)
    _dvc_is_clean(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.05
    assert {s: lock["stages"][s] for s in DATA_STAGES} == {s: flow_run["lock"]["stages"][s] for s in DATA_STAGES}
    # DVC pushes only what the remote lacks: the new model and evaluation, no data
    new = _remote_objects(root) - before
    assert new and new <= _stage_md5s(lock, ("train", "evaluate")) | _files_md5(root, ("artifacts/",)), new
    assert not new & _stage_md5s(lock, DATA_STAGES)

    # the same inputs again: as `dvc repro` would, the flow trains, registers and pushes nothing
    pushed, versions = _remote_objects(root), sorted((root / "registry/models/resnet-digits/versions").iterdir())
    registered = (root / "artifacts/registered.json").read_bytes()
    log = _flow(root, prefect_server)
    for stage in ("train", "evaluate", "register"):
        assert f"{stage}: up to date in dvc.lock" in log and f"Task run '{stage}-" not in log, log[-3000:]
    assert _remote_objects(root) == pushed, "nothing pushed the second time"
    assert sorted((root / "registry/models/resnet-digits/versions").iterdir()) == versions
    assert (root / "artifacts/registered.json").read_bytes() == registered
    _dvc_is_clean(root)


def _files_md5(root: Path, prefixes: tuple[str, ...]) -> set[str]:
    return {
        hashlib.md5(p.read_bytes()).hexdigest()
        for prefix in prefixes
        for p in (root / prefix).rglob("*")
        if p.is_file()
    }


def _restore(root: Path, spec: str, dest: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "resnet-pipeline"), "registry", "restore", spec, str(dest), "--repo", str(root)]
    proc = subprocess.run(
        [*cmd, "--registry", str(root / "registry")],
        cwd=dest.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_registry_restore_of_a_flow_version_gives_its_bytes_and_a_clean_dvc(flow_run: dict, tmp_path: Path):
    root, dest = flow_run["root"], tmp_path / "restored"
    version = json.loads((root / "registry/models/resnet-digits/versions/1/manifest.json").read_text())
    _restore(root, "resnet-digits:1", dest)

    def sha256(path: str) -> str:
        return hashlib.sha256((dest / path).read_bytes()).hexdigest()

    assert sha256("data/manifest.parquet") == version["data"]["manifest_sha256"]
    assert sha256("data/shards/index.json") == version["data"]["shards_index_sha256"]
    for entry in json.loads((dest / "data/shards/index.json").read_text())["shards"]:
        assert sha256(f"data/shards/{entry['file']}") == entry["sha256"]
    for name in ("model.keras", "labels.json", "saved_model/saved_model.pb"):
        assert sha256(f"artifacts/model/{name}") == version["files"][name]["sha256"], name
    assert _run(["git", "rev-parse", "HEAD"], dest).stdout.strip() == version["git_commit"]
    _dvc_is_clean(dest)


def test_registry_restore_fails_naming_an_object_missing_from_the_remote(flow_run: dict, tmp_path: Path):
    root, dest = flow_run["root"], tmp_path / "restored"
    lock = yaml.safe_load((root / "registry/models/resnet-digits/versions/1/dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["split"]["outs"] if o["path"] == "data/manifest.parquet")
    obj = root / ".dvc-remote/files/md5" / md5[:2] / md5[2:]
    aside = tmp_path / "aside"
    obj.rename(aside)
    try:
        proc = _restore(root, "resnet-digits:1", dest, check=False)
    finally:
        aside.rename(obj)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "resnet-digits:1" in proc.stderr and f"data/manifest.parquet (md5 {md5})" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no DIR, no half-restored folder beside it"


# --- DVC remote on S3 (SeaweedFS on loopback, tests/conftest.py `s3_server`) --------------------
# No AWS_REQUEST_CHECKSUM_CALCULATION / AWS_RESPONSE_CHECKSUM_VALIDATION override is needed:
# SeaweedFS 4.48 accepts botocore's default CRC32 request checksums (see infra/devs3.py),
# for single-part and multipart (70 MB checked by hand) uploads alike, and the default
# virtual-host/path addressing of s3fs works against an `http://127.0.0.1:<port>` endpoint.


def test_dvc_push_and_pull_through_s3_restore_data_and_model_byte_for_byte(
    dvc_project: Path, s3_server, tmp_path: Path
):
    dvc, project = str(BIN / "dvc"), dvc_project
    bucket = s3_server.make_bucket("dvc-e2e-roundtrip")
    outs = _cached_outs(project)
    assert {o.split("/")[0] for o in outs} == {"data", "artifacts"}, outs
    assert "artifacts/model/saved_model" in outs and "data/shards" in outs, outs
    before = _sha256_of_outs(project, outs)
    assert any(p.startswith("artifacts/model/saved_model/") for p in before), sorted(before)

    _run([dvc, "remote", "add", "s3store", f"s3://{bucket}/dvc"], project)
    try:
        _run([dvc, "remote", "modify", "s3store", "endpointurl", s3_server.endpoint_url], project)
        _run([dvc, "remote", "modify", "s3store", "region", s3_server.region], project)
        # secrets go to .dvc/config.local (git-ignored by .dvc/.gitignore), never to .dvc/config
        _run([dvc, "remote", "modify", "--local", "s3store", "access_key_id", s3_server.access_key], project)
        _run([dvc, "remote", "modify", "--local", "s3store", "secret_access_key", s3_server.secret_key], project)
        assert s3_server.secret_key not in (project / ".dvc/config").read_text()
        assert s3_server.secret_key in (project / ".dvc/config.local").read_text()

        pushed = _run([dvc, "push", "-r", "s3store"], project, timeout=600)
        assert "pushed" in pushed.stdout, pushed.stdout
        keys = _bucket_keys(s3_server.client(), bucket)
        # DVC 3 stores every file under dvc/files/md5/<2 hex>/<30 hex>: each tracked file must be there
        missing = {
            p for p, md5 in _md5_of_outs(project, outs).items() if f"dvc/files/md5/{md5[:2]}/{md5[2:]}" not in keys
        }
        assert not missing, f"not in s3://{bucket}: {sorted(missing)[:10]}"
        assert any(k.endswith(".dir") for k in keys)  # the directory listings (data/raw, data/shards, ...)

        for out in outs:
            target = project / out
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.rmtree(project / ".dvc/cache")  # so the pull has to come from S3
        assert not any((project / o).exists() for o in outs)

        pulled = _run([dvc, "pull", "-r", "s3store"], project, timeout=600)
        assert "fetched" in pulled.stdout, pulled.stdout
        after = _sha256_of_outs(project, outs)
        assert set(after) == set(before), sorted(set(after) ^ set(before))
        changed = sorted(p for p in before if after[p] != before[p])
        assert not changed, changed

        status = _run([dvc, "status"], project)
        assert "Data and pipelines are up to date." in status.stdout, status.stdout
        in_sync = _run([dvc, "status", "-c", "-r", "s3store"], project)
        assert "Cache and remote 's3store' are in sync." in in_sync.stdout, in_sync.stdout
    finally:  # leave the module's project with only its original remote
        subprocess.run([dvc, "remote", "remove", "s3store"], cwd=project, env=_env(), capture_output=True)
        subprocess.run([dvc, "remote", "remove", "--local", "s3store"], cwd=project, env=_env(), capture_output=True)
    assert "s3store" not in _run([dvc, "remote", "list"], project).stdout


def test_dvc_push_to_a_missing_s3_bucket_fails_with_no_such_bucket(s3_server, tmp_path: Path):
    """A tiny DVC project (not the module's): credentials from the AWS_* environment variables."""
    dvc, project = str(BIN / "dvc"), tmp_path / "tiny"
    (project / "data").mkdir(parents=True)
    (project / "data/x.bin").write_bytes(os.urandom(4096))
    _run([dvc, "init", "--no-scm", "-q"], project)
    _run([dvc, "config", "core.analytics", "false"], project)
    _run([dvc, "add", "data"], project)
    env = {**_env(), "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    good = s3_server.make_bucket("dvc-e2e-env-creds")
    for name, bucket in (("good", good), ("missing", "dvc-e2e-no-such-bucket")):
        _run([dvc, "remote", "add", name, f"s3://{bucket}/dvc"], project)
        _run([dvc, "remote", "modify", name, "endpointurl", s3_server.endpoint_url], project)

    # control: the same endpoint and environment credentials do work with an existing bucket
    ok = subprocess.run([dvc, "push", "-r", "good"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "2 files pushed" in ok.stdout  # x.bin + the .dir listing, ok.stdout + ok.stderr

    bad = subprocess.run(
        [dvc, "push", "-r", "missing"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0, bad.stdout + bad.stderr
    # DVC 3.67 / s3fs print the S3 error, not the bucket's name (the name only shows with `dvc push -v`):
    #   ERROR: unexpected error - The specified bucket does not exist: An error occurred (NoSuchBucket)
    #   when calling the ListObjectsV2 operation: The specified bucket does not exist
    assert "NoSuchBucket" in bad.stderr and "The specified bucket does not exist" in bad.stderr, bad.stderr
    verbose = subprocess.run(
        [dvc, "push", "-v", "-r", "missing"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode != 0 and "dvc-e2e-no-such-bucket" in verbose.stdout + verbose.stderr


def _cached_outs(project: Path) -> list[str]:
    """The outs of dvc.yaml that DVC caches (and so pushes/pulls); `cache: false` ones stay in git."""
    outs = []
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if (opts or {}).get("cache", True):
                outs.append(path)
    return sorted(outs)


def _files_of_outs(project: Path, outs: list[str]) -> dict[str, Path]:
    files = {}
    for out in outs:
        target = project / out
        for f in sorted(target.rglob("*")) if target.is_dir() else [target]:
            if f.is_file():
                files[f.relative_to(project).as_posix()] = f
    return files


def _sha256_of_outs(project: Path, outs: list[str]) -> dict[str, str]:
    import hashlib

    return {rel: hashlib.sha256(f.read_bytes()).hexdigest() for rel, f in _files_of_outs(project, outs).items()}


def _md5_of_outs(project: Path, outs: list[str]) -> dict[str, str]:
    import hashlib

    return {rel: hashlib.md5(f.read_bytes()).hexdigest() for rel, f in _files_of_outs(project, outs).items()}


def _bucket_keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_dvc_plots_are_each_defined_once_with_their_axes(dvc_project: Path):
    shown = json.loads(_run([str(BIN / "dvc"), "plots", "show", "--json"], dvc_project).stdout)
    assert not shown.get("errors"), shown["errors"]
    assert sorted(shown["data"]) == sorted(
        [
            "loss",
            "accuracy",
            "step-loss",
            "learning-rate",
            "confusion",
            "per-class-f1",
            "artifacts/model/curves.png",
            "artifacts/eval/confusion.png",
        ]
    )
    assert all(len(renders) == 1 for renders in shown["data"].values()), {k: len(v) for k, v in shown["data"].items()}
    encoding = {name: shown["data"][name][0]["content"]["encoding"] for name in ("loss", "step-loss", "per-class-f1")}
    assert encoding["loss"]["x"]["field"] == "epoch" and encoding["loss"]["y"]["scale"] == {"type": "log"}
    assert (encoding["step-loss"]["x"]["field"], encoding["step-loss"]["y"]["field"]) == ("step", "loss")
    assert encoding["step-loss"]["y"]["scale"] == {"type": "log"}
    assert (encoding["per-class-f1"]["x"]["field"], encoding["per-class-f1"]["y"]["field"]) == ("f1", "class")


def test_dvc_artifacts_get_from_a_fresh_clone_fetches_the_model(dvc_project: Path, tmp_path: Path):
    """`dvc push` to a local remote, `git clone`, `gto register` the artifact, `dvc artifacts get` from the clone.

    The remote is a folder given by its absolute path (added in the project's git-ignored config.local), as a
    second checkout shares one: with the relative `../.dvc-remote` of .dvc/config, a clone's remote is its own
    folder, and DVC 3.67's `push --all-commits` resolves it against `/` for other commits (/.dvc-remote)."""
    dvc = str(BIN / "dvc")
    remote = tmp_path / "remote"
    # the module's earlier tests rerun stages and pull into a fresh cache: commit the workspace they leave, so
    # that the clone checks out outputs the cache holds
    _run(["git", "add", "-A"], dvc_project)
    _run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "workspace", "--allow-empty"], dvc_project
    )
    _run([dvc, "remote", "add", "--local", "shared", str(remote)], dvc_project)
    try:  # --all-commits: HEAD's outputs, whatever an earlier test's `dvc exp run` left in the workspace
        _run([dvc, "push", "--all-commits", "-r", "shared"], dvc_project, timeout=600)
    finally:
        _run([dvc, "remote", "remove", "--local", "shared"], dvc_project)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(dvc_project), str(clone)], tmp_path)
    assert not (clone / "artifacts").exists() and not (clone / ".dvc/cache").exists()
    env_identity = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(
        [str(BIN / "gto"), "register", "resnet-classifier", "--version", "v1.0.0"],
        cwd=clone,
        env={**_env(), **env_identity},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _run([dvc, "remote", "modify", "--local", "local", "url", str(remote)], clone)
    lock = yaml.safe_load(_run(["git", "show", "HEAD:dvc.lock"], clone).stdout)  # what the clone checks out
    md5 = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}

    got = _run([dvc, "artifacts", "get", str(clone), "resnet-classifier", "-o", "model"], tmp_path)
    assert "Downloaded" in got.stdout + got.stderr
    model = tmp_path / "model"
    assert {p.relative_to(model).as_posix() for p in model.iterdir()} >= {
        "model.keras",
        "saved_model",
        "labels.json",
        "params.yaml",
    }
    import hashlib

    for name in ("model.keras", "labels.json", "params.yaml"):
        assert hashlib.md5((model / name).read_bytes()).hexdigest() == md5[f"artifacts/model/{name}"], name
    assert (model / "saved_model/saved_model.pb").exists() and (model / "saved_model/variables").is_dir()
