"""The Prefect deployments of prefect.yaml, for real: a Prefect server started here, `prefect deploy`,
a process worker on the pool, runs triggered through the REST API, models registered in an S3
registry on the session's SeaweedFS.

The worker clones a git repository of the project (a local path stands in for the remote: the
pull step is the real `git_clone`) into each deployment's own folder and runs the flow there. The
tests share the session's server (conftest `prefect_server`) and one worker, and pass in any
order: `first_run`, the first digits run of nightly in a fresh checkout, is a fixture; every test
leaves the nightly checkout holding the digits' data and checks versions relative to the ones it
found.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.prefectserver import api as _api
from tests.prefectserver import flow_logs as _flow_logs
from tests.prefectserver import stop_process
from tests.project import copy_project

pytestmark = pytest.mark.slow  # flow runs of the deployments

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "prefect.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".gitignore",
    "pyproject.toml",
    "resnet_pipeline",
    "flows",
]
POOL = "resnet-gpu"
DATA_TASKS = ("download", "split", "shard")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def deployed(prefect_server, s3_server, tmp_path_factory):
    """The project committed to a git repository, deployed with `prefect deploy --all`, the crash
    recovery automations applied (`resnet-pipeline recovery apply`), and a process worker on the
    pool; the S3 credentials and endpoint in the worker's environment."""
    origin = tmp_path_factory.mktemp("origin")
    copy_project(origin, PROJECT_FILES)
    workdir = tmp_path_factory.mktemp("worker")
    bucket = s3_server.make_bucket(f"deploy-{uuid.uuid4().hex[:12]}")
    env = dict(
        prefect_server.env,
        RESNET_PIPELINE_REPO=str(origin),
        RESNET_PIPELINE_WORKDIR=str(workdir),
        RESNET_PIPELINE_DVC_REMOTE=f"s3://{bucket}/dvc",  # where the runs push their data and model
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        TF_CPP_MIN_LOG_LEVEL="2",
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION=s3_server.region,
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_EC2_METADATA_DISABLED="true",
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run([*git, "commit", "-qm", "project"], origin, env)
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], origin, env)
    deploy = _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], origin, env, timeout=600)
    # the crash-recovery automations, as the README has users apply them; a grace of two heartbeats
    # (the default is three) to keep the heartbeat test short
    recovery = _run([str(BIN / "resnet-pipeline"), "recovery", "apply", "--heartbeat-grace", "60"], origin, env)
    workers = Workers(workdir, env)
    workers.start(POOL)
    try:
        yield {
            "base": prefect_server.base,
            "registry": f"s3://{bucket}/registry",
            "bucket": bucket,
            "workdir": workdir,
            "deploy_output": deploy.stdout,
            "recovery_output": recovery.stdout,
            "worker_log": workers.log_path(POOL),
            "workers": workers,
            "env": env,
        }
    finally:
        workers.stop_all()


class Workers:
    """The process workers of the tests, one per pool, each logging to `<workdir>-<pool>.log`; a
    worker can be killed with its flow runs (a machine gone) and started again."""

    def __init__(self, workdir: Path, env: dict) -> None:
        # a worker asks for scheduled runs every 2 s (Prefect's default: 10 s), to keep the waits short
        self.workdir, self.env = workdir, dict(env, PREFECT_WORKER_QUERY_SECONDS="2")
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, pool: str) -> Path:
        return self.workdir.parent / f"{self.workdir.name}-{pool}.log"

    def start(self, pool: str) -> None:
        with open(self.log_path(pool), "a") as log:
            self.procs[pool] = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, pool: str) -> None:
        """SIGKILL the pool's worker and everything in its process group."""
        proc = self.procs.pop(pool)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        self.procs.clear()


@pytest.fixture(scope="module")
def first_run(deployed) -> dict:
    """The first run of nightly: the digits in a fresh checkout, so every stage runs."""
    return _trigger_and_wait(deployed, {"overrides": _overrides(deployed)})


def _deployment(base: str, name: str) -> dict:
    return _api(base, "GET", f"/deployments/name/resnet-pipeline/{name}")


def _trigger(deployed: dict, parameters: dict, name: str = "nightly") -> str:
    deployment = _deployment(deployed["base"], name)
    return _api(
        deployed["base"], "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
    )["id"]


def _wait(deployed: dict, run_id: str, expect: str = "COMPLETED", timeout: float = 900) -> dict:
    base, deadline = deployed["base"], time.monotonic() + timeout
    while True:
        run = _api(base, "GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CANCELLED") or _stays_crashed(run):
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"flow run {run_id} still {run['state']['type']} after {timeout} s:\n"
                f"{deployed['worker_log'].read_text()[-4000:]}"
            )
        time.sleep(1)
    assert run["state"]["type"] == expect, (
        f"{run['state']}\n--- flow run log ---\n{_flow_logs(base, run_id)[-8000:]}"
        f"\n--- worker log ---\n{deployed['worker_log'].read_text()[-3000:]}"
    )
    return run


def _stays_crashed(run: dict) -> bool:
    """Crashed for good: the recovery automation reschedules a crashed run after its first start
    (run count 1..MAX_RESCHEDULES) and gives up on it after that, saying so."""
    from resnet_pipeline.recovery import MAX_RESCHEDULES

    state = run["state"]
    if state["type"] != "CRASHED":
        return False
    return "gave up" in (state["message"] or "") or not 1 <= run["run_count"] <= MAX_RESCHEDULES


def _trigger_and_wait(deployed: dict, parameters: dict, name: str = "nightly") -> dict:
    return _wait(deployed, _trigger(deployed, parameters, name))


def _task_runs(base: str, flow_run_id: str) -> dict[str, list[dict]]:
    runs = _api(base, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    by_task: dict[str, list[dict]] = {}
    for task_run in runs:  # named "<task name>-<suffix>"
        by_task.setdefault(task_run["name"].rsplit("-", 1)[0], []).append(task_run)
    return by_task


def _task_states(base: str, flow_run_id: str) -> dict[str, set[str]]:
    return {name: {r["state"]["name"] for r in runs} for name, runs in _task_runs(base, flow_run_id).items()}


def _overrides(deployed: dict, **more) -> dict:
    # the digits at their own 8x8 (the crop's padding in proportion): a sixteenth of 32 pixels' compute
    small = {"train.epochs": 1, "train.image_size": 8, "train.pad_crop": 2}
    return {**small, "register.registry": deployed["registry"], **more}


def _registry(deployed: dict, s3_server):
    from resnet_pipeline.registry import open_registry

    return open_registry(
        deployed["registry"],
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )


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
        assert deployment["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "resnet_pipeline"
        dvc_remote = deployment["job_variables"]["env"]["RESNET_PIPELINE_DVC_REMOTE"]
        assert dvc_remote == deployed["env"]["RESNET_PIPELINE_DVC_REMOTE"]
        steps = [next(iter(step)) for step in deployment["pull_steps"]]
        assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory"]
        clone = deployment["pull_steps"][0]["prefect.deployments.steps.git_clone"]
        assert clone["repository"] == deployed["env"]["RESNET_PIPELINE_REPO"]
        assert clone["clone_directory_name"] == entry["name"]  # each deployment in its own folder
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    nightly = _deployment(deployed["base"], "nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert {"auto-resume"} <= set(nightly["tags"]), "its crashed runs are resumed"
    assert nightly["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"


def test_recovery_apply_creates_the_automations_once_and_updates_them_in_place(deployed):
    from resnet_pipeline.recovery import NAMES

    assert deployed["recovery_output"].splitlines() == [f"created: {name}" for name in NAMES.values()]
    apply = [str(BIN / "resnet-pipeline"), "recovery", "apply", "--heartbeat-grace", "60"]
    again = _run(apply, deployed["workdir"], deployed["env"])
    assert again.stdout.splitlines() == [f"updated: {name}" for name in NAMES.values()]
    names = [a["name"] for a in _api(deployed["base"], "POST", "/automations/filter", {})]
    assert all(names.count(name) == 1 for name in NAMES.values()), names


def _labels(registry, spec: str) -> list[str]:
    return registry.manifest(spec)["labels"]


def test_digits_then_another_dataset_then_digits_in_one_checkout(deployed, first_run, s3_server, tmp_path_factory):
    from tests.data.test_data_stages import small_image_folder

    base, registry, first = deployed["base"], _registry(deployed, s3_server), first_run
    states = _task_states(base, first["id"])
    assert {t: states.get(t) for t in (*DATA_TASKS, "train", "evaluate", "register")} == {
        t: {"Completed"} for t in (*DATA_TASKS, "train", "evaluate", "register")
    }, states
    assert states.get("write-shard") == {"Completed"}, "the shard writing is mapped over tasks"
    assert registry.versions("resnet-digits")[0] == 1
    first_promotion = registry.history("resnet-digits", "champion")[0]
    assert (first_promotion["version"], first_promotion["outcome"]) == (1, "won")
    logs = _flow_logs(base, first["id"])  # the resnet_pipeline loggers reach the run's log
    for line in (
        "download: wrote 1797 files of digits",
        "split: ",
        "shard: ",
        "outputs carry key shard-",
        "train: starting",
        "holding ",
    ):
        assert line in logs, line

    by_key = {
        a["key"]: a
        for a in _api(base, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}})
    }
    report = by_key["resnet-report"]["data"]
    assert "resnet-digits:1" in report and "Gate: promoted to `champion`" in report
    assert f"{deployed['registry']}/models/resnet-digits/versions/1/" in report
    assert by_key["resnet-per-class"]["type"] == "table"
    assert len(json.loads(by_key["resnet-per-class"]["data"])) == 10  # ten digit classes

    pets = small_image_folder(tmp_path_factory.mktemp("pets"), per_class=30)
    before = registry.versions("resnet-digits")
    other = _trigger_and_wait(
        deployed,
        {
            "dataset": "imagefolder",
            "overrides": _overrides(
                deployed,
                **{"download.path": str(pets), "register.model_name": "resnet-pets", "train.global_batch_size": 16},
            ),
        },
    )
    states = _task_states(base, other["id"])
    assert {t: states.get(t) for t in DATA_TASKS} == {t: {"Completed"} for t in DATA_TASKS}, states
    assert _labels(registry, "resnet-pets:1") == ["cat", "dog"]

    third = _trigger_and_wait(deployed, {"overrides": _overrides(deployed)})
    states = _task_states(base, third["id"])
    # raw/digits is still the digits' (its .complete carries the key); manifest and shards are the pets'
    assert {t: states.get(t) for t in DATA_TASKS} == {
        "download": {"Cached"},
        "split": {"Completed"},
        "shard": {"Completed"},
    }, states
    assert registry.versions("resnet-digits") == [*before, before[-1] + 1], "one version, the digits run's"
    newest = f"resnet-digits:{before[-1] + 1}"
    assert _labels(registry, newest) == [str(d) for d in range(10)]
    one, two = registry.manifest("resnet-digits:1"), registry.manifest(newest)
    assert two["data"] == one["data"]  # the same data by content: manifest, shard index, stage keys
    assert set(two["data"]["stage_keys"]) == set(DATA_TASKS)
    assert registry.manifest("resnet-pets:1")["data"]["stage_keys"]["split"] != two["data"]["stage_keys"]["split"]
    checkout = deployed["workdir"] / "nightly"
    labels = json.loads((checkout / "artifacts/model/labels.json").read_text())["classes"]
    assert labels == [str(d) for d in range(10)]


def test_a_run_pushes_its_data_and_model_and_its_version_restores_without_the_worker_folder(
    deployed, first_run, s3_server, tmp_path
):
    """The first run's version: its dvc.lock and commit recorded, its data and model in the DVC remote
    on S3; with the worker's folder gone (moved aside for the test), `registry restore` rebuilds it."""
    import hashlib

    registry, env = _registry(deployed, s3_server), deployed["env"]
    manifest = registry.manifest("resnet-digits:1")  # first_run's: the first digits version of the bucket
    origin = env["RESNET_PIPELINE_REPO"]
    assert manifest["git_commit"] == _run(["git", "rev-parse", "HEAD"], Path(origin), env).stdout.strip()
    assert manifest["dvc"]["remote"] == {"name": "pipeline", "url": env["RESNET_PIPELINE_DVC_REMOTE"]}
    lock = yaml.safe_load(registry.fetch_file("resnet-digits:1", "dvc.lock", tmp_path / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=deployed["bucket"], Prefix="dvc/")
    keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    for path in ("data/manifest.parquet", "data/labels.json", "data/shards", "artifacts/model/model.keras"):
        assert f"dvc/files/md5/{outs[path][:2]}/{outs[path][2:]}" in keys, path

    checkout = deployed["workdir"] / "nightly"
    aside = checkout.with_name("nightly-aside")
    dest = tmp_path / "restored"
    checkout.rename(aside)
    try:
        restore = [str(BIN / "resnet-pipeline"), "registry", "restore", "resnet-digits:1", str(dest)]
        _run([*restore, "--repo", origin, "--registry", deployed["registry"]], tmp_path, env, timeout=600)
    finally:
        aside.rename(checkout)

    def sha256(path: str) -> str:
        return hashlib.sha256((dest / path).read_bytes()).hexdigest()

    assert sha256("data/manifest.parquet") == manifest["data"]["manifest_sha256"]
    assert sha256("data/shards/index.json") == manifest["data"]["shards_index_sha256"]
    for name in ("model.keras", "labels.json", "saved_model/saved_model.pb"):
        assert sha256(f"artifacts/model/{name}") == manifest["files"][name]["sha256"], name
    status = _run([str(BIN / "dvc"), "status"], dest, env)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout


def test_a_run_on_a_held_folder_fails_at_once_naming_the_holder(deployed, first_run):
    from resnet_pipeline.runlock import folder_lock

    checkout = deployed["workdir"] / "nightly"
    with folder_lock(checkout, {"flow_run_name": "test-holder", "flow_run_id": "held-by-the-test"}):
        run = _wait(deployed, _trigger(deployed, {"overrides": _overrides(deployed)}), expect="FAILED")
    started = _api(deployed["base"], "GET", f"/flow_runs/{run['id']}")
    assert "in use by test-holder (flow run held-by-the-test)" in run["state"]["message"] + _flow_logs(
        deployed["base"], run["id"]
    ), run["state"]
    assert _task_runs(deployed["base"], run["id"]) == {}, "no stage ran"
    assert started["total_run_time"] < 30


def _flow_process(run_id: str) -> int | None:
    """The pid of the process running flow run `run_id` (the leaf with its PREFECT__FLOW_RUN_ID)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids, parents = set(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.add(int(proc.name))
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    leaves = [pid for pid in pids if pid not in parents.values()]
    return max(leaves) if leaves else None


def _steps_trained(logs: str) -> int:
    """The step count at the end of the last epoch, from the train stage's epoch log lines."""
    return int(re.findall(r"epoch \d+: \{.*?'step': (\d+)", logs)[-1])


def _states(base: str, run_id: str) -> list[dict]:
    """The flow run's states, oldest first."""
    return sorted(_api(base, "GET", f"/flow_run_states/?flow_run_id={run_id}"), key=lambda s: s["timestamp"])


RECOVERY = "resnet-pipeline recovery: "  # what the automations' state messages start with
RESCHEDULED = RECOVERY + "rescheduled after a crash"


def _crashes_and_reschedules(base: str, run_id: str) -> list[tuple[str, str]]:
    """(type, message) of the run's Crashed and Scheduled states after its first start, in order. The
    worker reports a killed process twice (its runner, then itself, about 2 s apart); the second
    report, when it lands on the first, is left out: one crash, one entry."""
    states = _states(base, run_id)
    first_run = next(i for i, s in enumerate(states) if s["type"] == "RUNNING")
    history: list[tuple[str, str]] = []
    for state in states[first_run:]:
        kind, message = state["type"], state["message"] or ""
        if kind not in ("CRASHED", "SCHEDULED"):
            continue
        if kind == "CRASHED" and history and history[-1][0] == "CRASHED" and not message.startswith(RECOVERY):
            continue  # the worker's second report of the same crash
        history.append((kind, message))
    return history


def test_two_runs_at_once_one_preempted_one_killed_mid_epoch_both_finish_by_themselves(deployed, first_run, s3_server):
    """Two runs of nightly triggered together (one waits for the deployment's concurrency slot). The
    first to train gets SIGTERM mid-epoch (preemption): its train task resumes from the checkpoint it
    saved. The second gets SIGKILL mid-epoch (the OOM killer, a lost process): the worker reports it
    Crashed, the recovery automation schedules the same flow run again, and it resumes from its last
    checkpoint in the same folder. No command is given after the signals."""
    base, registry = deployed["base"], _registry(deployed, s3_server)
    before = registry.versions("resnet-digits")
    clean = registry.manifest(f"resnet-digits:{before[-1]}")["data"]
    runs = {
        _trigger(
            deployed,
            {
                "overrides": _overrides(
                    deployed,
                    **{"train.epochs": 2, "train.global_batch_size": 32, "train.label_smoothing": smoothing},
                    # 32 pixels: the signals must land mid-epoch, which wants steps that take a while
                    **{"train.image_size": 32, "train.pad_crop": 4},
                    # a steps.csv row per step; a checkpoint every 5 steps for the SIGKILL to fall back to
                    **{"train.summary_every_steps": 1, "train.checkpoint_every_steps": 5},
                )
            },
        ): smoothing
        for smoothing in (0.1, 0.2)
    }
    deadline, target = time.monotonic() + 600, None
    while target is None:
        for run_id in runs:
            if "Epoch 1/2" in _flow_logs(base, run_id) and (pid := _flow_process(run_id)):
                os.kill(pid, signal.SIGTERM)
                target = run_id
                break
        assert time.monotonic() < deadline, "no run started training"
        time.sleep(0.5)
    other = next(r for r in runs if r != target)
    deadline = time.monotonic() + 600
    while not ("Epoch 2/2" in _flow_logs(base, other) and (pid := _flow_process(other))):
        assert time.monotonic() < deadline, "the second run did not reach its second epoch"
        time.sleep(0.5)
    time.sleep(random.random())  # a random step of the second epoch, after at least one checkpoint
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    finished = {run_id: _wait(deployed, run_id) for run_id in runs}
    print(f"\nSIGKILL of the flow run's process to its completion: {time.monotonic() - killed:.0f} s")

    logs = _flow_logs(base, target)
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", logs)
    assert stopped, logs[-4000:]
    assert f"at step {stopped.group(1)} of " in logs  # resumed exactly where it stopped: no step twice
    (train_run,) = _task_runs(base, target)["train"]
    assert train_run["run_count"] == 2 and train_run["state"]["name"] == "Completed"
    assert finished[target]["run_count"] == 1, "SIGTERM is not a crash"
    assert _steps_trained(logs) == _steps_trained(_flow_logs(base, other)) > int(stopped.group(1)) > 0
    for run_id in runs:
        assert {t: _task_states(base, run_id).get(t) for t in DATA_TASKS} == {t: {"Cached"} for t in DATA_TASKS}

    # the killed run: Crashed by the worker, rescheduled by the automation, resumed as attempt 2
    assert finished[other]["run_count"] == 2
    history = _crashes_and_reschedules(base, other)
    assert [t for t, _ in history] == ["CRASHED", "SCHEDULED"], history
    assert "-9" in history[0][1] and history[1][1].startswith(RESCHEDULED), history
    logs = _flow_logs(base, other)
    assert "attempt 2 of this flow run" in logs and "resuming from" in logs, logs[-4000:]
    model = deployed["workdir"] / "nightly/artifacts/model"  # the killed run trained last in the folder
    summary = json.loads((model / "train.json").read_text())
    assert summary["steps"] == 2 * summary["steps_per_epoch"]  # an uninterrupted run's count
    with open(model / "steps.csv", newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == list(range(1, summary["steps"] + 1)), "every step once: none lost, none twice"

    after = registry.versions("resnet-digits")
    assert len(after) == len(before) + 2, "one version per run"
    versions = {registry.manifest(f"resnet-digits:{v}")["params"]["train"]["label_smoothing"]: v for v in after[-2:]}
    assert set(versions) == {0.1, 0.2}
    models = set()
    for version in versions.values():
        manifest = registry.manifest(f"resnet-digits:{version}")
        assert manifest["data"] == clean, "trained on the shards of a clean run (index and manifest sha256)"
        assert manifest["labels"] == [str(d) for d in range(10)]
        models.add(manifest["files"]["model.keras"]["sha256"])
    assert len(models) == 2, "each version holds its own model"
    assert all(r["state"]["type"] == "COMPLETED" for r in finished.values())


def test_the_weekly_deployment_registers_under_its_own_name_in_its_own_folder(
    deployed, first_run, s3_server, tmp_path_factory
):
    from tests.data.test_data_stages import small_image_folder

    registry = _registry(deployed, s3_server)
    nightly_index = (deployed["workdir"] / "nightly/data/shards/index.json").read_bytes()
    weekly = _deployment(deployed["base"], "cifar10-weekly")["parameters"]
    pets = small_image_folder(tmp_path_factory.mktemp("weekly-pets"), per_class=30)
    # CIFAR-10 itself is on the internet: the weekly recipe on a small local folder, briefly
    _trigger_and_wait(
        deployed,
        {
            **weekly,
            "dataset": "imagefolder",
            "depth": 20,
            "overrides": {
                **weekly["overrides"],
                **_overrides(deployed, **{"download.path": str(pets), "train.global_batch_size": 16}),
            },
        },
        name="cifar10-weekly",
    )
    assert registry.versions("resnet56-cifar10") == [1]
    assert registry.manifest("resnet56-cifar10:1")["params"]["train"]["lr_decay_at"] == [32000, 48000]
    assert (deployed["workdir"] / "cifar10-weekly/data/raw/imagefolder/.complete").is_file()
    assert (deployed["workdir"] / "nightly/data/shards/index.json").read_bytes() == nightly_index


def test_no_persisted_result_is_a_pickle(deployed, first_run):
    storage = Path(deployed["env"]["PREFECT_HOME"]) / "storage"
    files = [p for p in storage.iterdir() if p.is_file()]
    assert len(files) >= 6
    for path in files:
        record = json.loads(path.read_text())  # a pickle is not JSON
        if "metadata" in record:
            assert record["metadata"]["serializer"]["type"] == "json", path
            json.loads(record["result"])


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
        assert parameters.pop("lock_wait_seconds") == 0
        assert parameters.pop("force") is False
        cfg = pipeline.load_config(parameters.pop("params"), str(REPO), parameters.pop("overrides", None), **parameters)
        if "depth" in entry["parameters"]:
            assert cfg.train.depth == entry["parameters"]["depth"]
    with pytest.raises(ConfigError, match=r"train\.depth: received 19"):
        pipeline.load_config("params.yaml", str(REPO), {"train.variant": "cifar"}, depth=19)
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        pipeline.load_config("params.yaml", str(REPO), {"train.epochz": 3})


# --------------------------------------------------------------------------- crash recovery


def _copy_deployment(deployed: dict, name: str, pool: str) -> None:
    """A deployment `name` on `pool` like nightly (the same flow, tags, parameters, concurrency limit
    and job variables) cloning into a folder of its own, `name/`; no schedule."""
    nightly = _deployment(deployed["base"], "nightly")
    pull = json.loads(json.dumps(nightly["pull_steps"]).replace('"nightly"', json.dumps(name)))
    body = {
        key: nightly[key]
        for key in (
            "flow_id",
            "entrypoint",
            "path",
            "parameters",
            "parameter_openapi_schema",
            "enforce_parameter_schema",
            "job_variables",
            "tags",
            "concurrency_options",
        )
    }
    body |= {"name": name, "work_pool_name": pool, "pull_steps": pull, "concurrency_limit": 1}
    _api(deployed["base"], "POST", "/deployments/", body)


def _heartbeats(base: str, run_id: str) -> int:
    events = _api(
        base,
        "POST",
        "/events/filter",
        {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            },
            "limit": 50,
        },
    )
    return len(events["events"])


@pytest.fixture(scope="module")
def crash_scenarios(deployed, first_run):
    """Three runs at once, with no command given to recover any of them:

    - `machine`: a run of `spot` (a copy of nightly on a pool of its own) whose worker and flow run
      are SIGKILLed together once it has sent a heartbeat (the machine is gone); the worker is started
      again once the run is Crashed;
    - `crashing`: a run of `crashy` (another copy, on the main pool) whose process is SIGKILLed each
      time it starts running (the deliberate fault), until the automation gives up;
    - `cancelled`: a nightly run cancelled from the API as the UI does (Cancelling) while it trains.

    Each gives its flow run and what the test saw; the tests below check them."""
    base, workers, env = deployed["base"], deployed["workers"], deployed["env"]
    _run([str(BIN / "prefect"), "work-pool", "create", "spot", "--type", "process"], deployed["workdir"], env)
    workers.start("spot")
    _copy_deployment(deployed, "spot", "spot")
    _copy_deployment(deployed, "crashy", POOL)
    small = _overrides(deployed, **{"register.model_name": "resnet-spot"})
    machine = {"id": _trigger(deployed, {"overrides": small}, name="spot")}
    crashing = {"id": _trigger(deployed, {"overrides": _overrides(deployed)}, name="crashy"), "kills": []}
    long = {"train.epochs": 3, "train.image_size": 32, "train.pad_crop": 4, "register.model_name": "resnet-cancel"}
    cancelled = {"id": _trigger(deployed, {"overrides": _overrides(deployed, **long)})}

    def run(run_id: str) -> dict:
        return _api(base, "GET", f"/flow_runs/{run_id}")

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        # the machine: kill the worker and the run after the run's first heartbeat, then bring a worker back
        m = run(machine["id"])
        if "killed" not in machine and m["state"]["type"] == "RUNNING" and _heartbeats(base, machine["id"]):
            pid = _flow_process(machine["id"])
            if pid:
                workers.kill("spot")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it was in the worker's process group
                machine["killed"] = time.monotonic()
        elif "killed" in machine and "crashed" not in machine and m["state"]["type"] == "CRASHED":
            machine["crashed"] = time.monotonic()
            workers.start("spot")
        # the deliberate fault: each attempt is killed as soon as it runs
        c = run(crashing["id"])
        if c["state"]["type"] == "RUNNING" and c["run_count"] not in crashing["kills"]:
            if pid := _flow_process(crashing["id"]):
                os.kill(pid, signal.SIGKILL)
                crashing["kills"].append(c["run_count"])
        if c["state"]["type"] == "CRASHED" and "gave up" in (c["state"]["message"] or ""):
            crashing.setdefault("gave_up", time.monotonic())
        # the cancellation, while it trains
        if "cancel_at" not in cancelled and "Epoch 1/3" in _flow_logs(base, cancelled["id"]):
            body = {"state": {"type": "CANCELLING", "name": "Cancelling"}}
            _api(base, "POST", f"/flow_runs/{cancelled['id']}/set_state", body)
            cancelled["cancel_at"] = time.monotonic()
        if m["state"]["type"] in ("COMPLETED", "FAILED"):
            machine.setdefault("ended", time.monotonic())
        done = "ended" in machine and "gave_up" in crashing
        # a crashed run is rescheduled 10 s after its crash: 20 s more shows the gave-up one stays
        if done and time.monotonic() > crashing["gave_up"] + 20:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the scenarios did not end in 900 s: {machine}, {crashing}, {cancelled}")
    for scenario in (machine, crashing, cancelled):
        scenario["run"] = run(scenario["id"])
    print(
        f"\nmachine gone: Crashed {machine['crashed'] - machine['killed']:.0f} s after the kill (grace 60 s), "
        f"Completed {machine['ended'] - machine['killed']:.0f} s after it"
    )
    return {"machine": machine, "crashing": crashing, "cancelled": cancelled}


def test_a_run_whose_machine_died_is_crashed_by_heartbeat_expiry_and_completes_on_a_worker_back(
    deployed, crash_scenarios, s3_server
):
    base, machine = deployed["base"], crash_scenarios["machine"]
    assert machine["run"]["state"]["type"] == "COMPLETED", machine["run"]["state"]
    history = _crashes_and_reschedules(base, machine["id"])
    assert [t for t, _ in history] == ["CRASHED", "SCHEDULED"], history
    assert history[0][1].startswith("resnet-pipeline recovery: no heartbeat for 60 s"), history
    assert history[1][1].startswith(RESCHEDULED), history
    assert machine["run"]["run_count"] == 2
    # Crashed no sooner than the grace allows after the last heartbeat, and within a bounded time
    assert 30 <= machine["crashed"] - machine["killed"] <= 150
    assert "attempt 2 of this flow run" in _flow_logs(base, machine["id"])
    assert _registry(deployed, s3_server).versions("resnet-spot") == [1], "exactly one version"


def test_a_run_that_crashes_every_time_is_rescheduled_exactly_n_times_then_stays_crashed_saying_why(
    deployed, crash_scenarios
):
    from resnet_pipeline.recovery import MAX_RESCHEDULES

    base, crashing = deployed["base"], crash_scenarios["crashing"]
    assert crashing["kills"] == list(range(1, MAX_RESCHEDULES + 2)), "each attempt killed once"
    run = crashing["run"]
    assert run["state"]["type"] == "CRASHED" and run["run_count"] == MAX_RESCHEDULES + 1
    assert f"crashed on {MAX_RESCHEDULES + 1} attempts in a row" in run["state"]["message"]
    history = _crashes_and_reschedules(base, crashing["id"])
    shown = "\n".join(f"{t} {m[:120]}" for t, m in history)
    # the last crash, then the automation's Crashed naming the attempts (the same again should another
    # report of that crash arrive: the give-up is idempotent), and nothing else after
    expected = ["CRASHED", "SCHEDULED"] * MAX_RESCHEDULES + ["CRASHED", "CRASHED"]
    assert [t for t, _ in history][: len(expected)] == expected, shown
    assert all(t == "CRASHED" and "gave up" in m for t, m in history[len(expected) - 1 :]), shown
    assert sum(m.startswith(RESCHEDULED) for _, m in history) == MAX_RESCHEDULES, shown


def test_a_cancelled_run_is_never_resumed(deployed, crash_scenarios, s3_server):
    base, cancelled = deployed["base"], crash_scenarios["cancelled"]
    run = cancelled["run"]
    assert "cancel_at" in cancelled, "the run never trained"
    assert run["state"]["type"] == "CANCELLED" and run["run_count"] == 1, run["state"]
    types = [s["type"] for s in _states(base, cancelled["id"])]
    assert types[-2:] == ["CANCELLING", "CANCELLED"] and "CRASHED" not in types, types
    (train_run,) = _task_runs(base, cancelled["id"])["train"]
    assert train_run["run_count"] == 1, "the train task was not retried after the cancellation's SIGTERM"
    assert _registry(deployed, s3_server).versions("resnet-cancel") == []
