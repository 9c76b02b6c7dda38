"""End to end on the embedded digits: real `dvc repro`, a real Prefect flow run, DVC remotes.

These run the pipeline with 1-2 training epochs so that they stay fast; `make run` trains the
default 30 epochs.
"""

from __future__ import annotations

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
    _write_params(project, epochs=1, image_size=8, pad_crop=2)  # the digits at their own 8x8
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], project)
    proc = _run([str(BIN / "dvc"), "repro"], project, timeout=900)
    assert _ran_stages(proc.stdout) == set(STAGES), proc.stdout
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], project)
    versions = project / "registry/models/resnet-digits/versions"
    return {
        "project": project,
        "registered": json.loads((project / "artifacts/registered.json").read_text()),
        "versions": sorted(p.name for p in versions.iterdir()),
    }


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
    }
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


def test_prefect_flow_writes_the_same_manifest_and_shards_as_dvc(dvc_project: Path, prefect_server, tmp_path: Path):
    root = tmp_path / "flow"
    root.mkdir()
    shutil.copy(dvc_project / "params.yaml", root / "params.yaml")
    # against the session's server (PREFECT_API_URL), as a deployment's run is: no temporary server
    flow = [sys.executable, str(REPO / "flows/pipeline.py"), "--root", str(root)]
    proc = subprocess.run(
        flow, cwd=REPO, env={**_env(), **prefect_server.env}, capture_output=True, text=True, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    for stage in STAGES:
        if stage != "shard":
            assert f"Task run '{stage}-" in log, log[-3000:]
    # the shard stage is one planning task and one task per shard file, mapped
    shard_files = json.loads((dvc_project / "data/shards/index.json").read_text())["shards"]
    assert "Task run 'plan-shards-" in log
    assert log.count("Task run 'write-shard-") >= len(shard_files) >= 3
    assert "Flow run" in log and "Finished in state Completed()" in log
    assert (root / "data/manifest.parquet").read_bytes() == (dvc_project / "data/manifest.parquet").read_bytes()
    dvc_shards = sorted(p.name for p in (dvc_project / "data/shards").iterdir())
    assert dvc_shards == sorted(p.name for p in (root / "data/shards").iterdir())
    for name in dvc_shards:
        assert (root / "data/shards" / name).read_bytes() == (dvc_project / "data/shards" / name).read_bytes(), name
    assert json.loads((root / "artifacts/registered.json").read_text())["version"] == 1
    # the flow's version names the same data as dvc repro's: manifest, shard index and stage keys
    flow_version = json.loads((root / "registry/models/resnet-digits/versions/1/manifest.json").read_text())
    dvc_version = json.loads((dvc_project / "registry/models/resnet-digits/versions/1/manifest.json").read_text())
    assert flow_version["data"] == dvc_version["data"]
    assert flow_version["data"]["stage_keys"]["shard"].startswith("shard-")


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
