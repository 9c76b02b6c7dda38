"""The Prefect deployments of prefect.yaml, for real: a Prefect server started here, `prefect deploy`,
a process worker on the pool, runs triggered through the REST API, the model registered in an S3
registry on the session's SeaweedFS, and the data tasks found `Cached` on a rerun with only a
training parameter changed.

The worker clones a git repository of the project (a local path stands in for the remote: the
pull step is the real `git_clone`), runs `dvc pull`, then the flow on the embedded digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from resnet_pipeline.devs3 import free_ports
from tests.project import copy_project

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["dvc.yaml", "params.yaml", "prefect.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore",
                 "pyproject.toml", "resnet_pipeline", "flows"]
POOL = "resnet-gpu"
DATA_TASKS = ("download", "split", "shard")


def _api(base: str, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on a free loopback port with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    (port,) = free_ports(1)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            _api(base, "GET", "/health")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
    try:
        yield {"base": base, "env": env, "home": home}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server, s3_server, tmp_path_factory):
    """The project committed to a git repository, deployed with `prefect deploy --all`, and a
    process worker on the pool; the S3 credentials and endpoint in the worker's environment."""
    origin = tmp_path_factory.mktemp("origin")
    copy_project(origin, PROJECT_FILES)
    workdir = tmp_path_factory.mktemp("worker")
    bucket = s3_server.make_bucket(f"deploy-{uuid.uuid4().hex[:12]}")
    env = dict(prefect_server["env"], RESNET_PIPELINE_REPO=str(origin), RESNET_PIPELINE_WORKDIR=str(workdir),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_DEFAULT_REGION=s3_server.region, AWS_ENDPOINT_URL=s3_server.endpoint_url,
               AWS_EC2_METADATA_DISABLED="true")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run([*git, "commit", "-qm", "project"], origin, env)
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], origin, env)
    deploy = _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], origin, env, timeout=600)
    worker_log = open(workdir.parent / f"{workdir.name}-worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                              cwd=workdir, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"base": prefect_server["base"], "registry": f"s3://{bucket}/registry", "workdir": workdir,
               "deploy_output": deploy.stdout, "worker_log": Path(worker_log.name), "env": env}
    finally:
        _stop(worker)
        worker_log.close()


def _deployment(base: str, name: str) -> dict:
    return _api(base, "GET", f"/deployments/name/resnet-pipeline/{name}")


def _trigger_and_wait(deployed: dict, parameters: dict, timeout: float = 900) -> dict:
    base = deployed["base"]
    deployment = _deployment(base, "nightly")
    run = _api(base, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
    deadline = time.monotonic() + timeout
    while True:
        run = _api(base, "GET", f"/flow_runs/{run['id']}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run['id']} still {run['state']['type']} after {timeout} s:\n"
                        f"{deployed['worker_log'].read_text()[-4000:]}")
        time.sleep(3)
    assert run["state"]["type"] == "COMPLETED", (
        f"{run['state']}\n--- flow run log ---\n{_flow_logs(base, run['id'])[-8000:]}"
        f"\n--- worker log ---\n{deployed['worker_log'].read_text()[-3000:]}")
    return run


def _flow_logs(base: str, flow_run_id: str) -> str:
    logs = _api(base, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200,
                                                "sort": "TIMESTAMP_ASC"})
    return "\n".join(f"{entry['level']} {entry['message']}" for entry in logs)


def _task_states(base: str, flow_run_id: str) -> dict[str, set[str]]:
    runs = _api(base, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    states: dict[str, set[str]] = {}
    for task_run in runs:  # named "<task name>-<suffix>"
        states.setdefault(task_run["name"].rsplit("-", 1)[0], set()).add(task_run["state"]["name"])
    return states


def _shared(deployed: dict) -> dict:
    return {"overrides": {"train.epochs": 1, "register.registry": deployed["registry"]}}


def test_deploy_creates_both_deployments_with_schedules_on_the_pool(deployed):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for entry in spec["deployments"]:
        deployment = _deployment(deployed["base"], entry["name"])
        assert deployment["work_pool_name"] == POOL == entry["work_pool"]["name"]
        assert deployment["entrypoint"] == "flows/pipeline.py:resnet_pipeline_flow"
        crons = [s["schedule"]["cron"] for s in deployment["schedules"]]
        assert crons == [s["cron"] for s in entry["schedules"]]
        assert all(s["active"] for s in deployment["schedules"])
        assert deployment["job_variables"]["working_dir"] == str(deployed["workdir"])
        steps = [next(iter(step)) for step in deployment["pull_steps"]]
        assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
                         "prefect.deployments.steps.run_shell_script"]
        assert deployment["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == \
            deployed["env"]["RESNET_PIPELINE_REPO"]
    nightly = _deployment(deployed["base"], "nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"


def test_api_triggered_runs_register_to_s3_and_reuse_cached_data_tasks(deployed, s3_server):
    from resnet_pipeline.registry import open_registry

    base = deployed["base"]
    first = _trigger_and_wait(deployed, _shared(deployed))
    states = _task_states(base, first["id"])
    assert {t: states.get(t) for t in (*DATA_TASKS, "train", "evaluate", "register")} == {
        t: {"Completed"} for t in (*DATA_TASKS, "train", "evaluate", "register")}, states
    assert states.get("write-shard") == {"Completed"}, "the shard writing is mapped over tasks"
    registry = open_registry(deployed["registry"], endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                             access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    assert registry.versions("resnet-digits") == [1]
    assert registry.aliases("resnet-digits") == {"champion": 1}

    result_report = _api(base, "POST", "/artifacts/filter",
                         {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}})
    by_key = {a["key"]: a for a in result_report}
    report = by_key["resnet-report"]["data"]
    assert "resnet-digits:1" in report and "Gate: promoted to `champion`" in report
    assert f"{deployed['registry']}/models/resnet-digits/versions/1/" in report
    assert by_key["resnet-per-class"]["type"] == "table"
    assert len(json.loads(by_key["resnet-per-class"]["data"])) == 10  # ten digit classes

    second = _trigger_and_wait(deployed, {"overrides": {**_shared(deployed)["overrides"], "train.label_smoothing": 0.1}})
    states = _task_states(base, second["id"])
    assert {t: states.get(t) for t in DATA_TASKS} == {t: {"Cached"} for t in DATA_TASKS}, states
    assert states.get("train") == {"Completed"} and states.get("register") == {"Completed"}, states
    assert "write-shard" not in states, "a cached shard stage writes no shard"
    assert registry.versions("resnet-digits") == [1, 2]
    manifest = registry.manifest("resnet-digits:2")
    assert manifest["params"]["train"]["label_smoothing"] == 0.1
    assert manifest["data"]["manifest_sha256"] == registry.manifest("resnet-digits:1")["data"]["manifest_sha256"]


def test_bad_parameters_fail_the_run_naming_the_key(deployed):
    base = deployed["base"]
    deployment = _deployment(base, "nightly")
    with pytest.raises(urllib.error.HTTPError) as err:  # the server checks types against the flow's schema
        _api(base, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"depth": "deep"}})
    assert err.value.code == 409 and "depth" in err.value.read().decode()


def _flow_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("resnet_pipeline_flow_module", REPO / "flows/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameters_of_every_deployment_validate_like_params_yaml():
    from resnet_pipeline.config import ConfigError

    pipeline = _flow_module()
    for entry in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        parameters = pipeline.resnet_pipeline_flow.validate_parameters(dict(entry["parameters"]))
        assert parameters.pop("root") == "."  # the worker's checkout
        cfg = pipeline.load_config(parameters.pop("params"), str(REPO), parameters.pop("overrides", None), **parameters)
        if "depth" in entry["parameters"]:
            assert cfg.train.depth == entry["parameters"]["depth"]
    with pytest.raises(ConfigError, match=r"train\.depth: received 19"):
        pipeline.load_config("params.yaml", str(REPO), {"train.variant": "cifar"}, depth=19)
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        pipeline.load_config("params.yaml", str(REPO), {"train.epochz": 3})
