"""infra/: the GPU worker Dockerfile, the multi-worker Kubernetes manifest, the local S3 dev server.

No docker or kubectl here: the Dockerfile and the manifest are parsed and checked against what the
code and the other files accept (requirements.lock, prefect.yaml, params.yaml, the CLI parser,
`read_tf_config`); the manifest's shell command is run with `/bin/sh` to get the real TF_CONFIG.
`infra/dev-s3.sh` is run for real.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
MANIFEST = INFRA / "k8s" / "train-multiworker.yaml"
DEV_S3 = INFRA / "dev-s3.sh"


# --------------------------------------------------------------------------- helpers


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments and blank lines dropped, `\\` continuations joined.

    Comment lines inside a continued instruction are skipped, as Docker does. Parser directives
    (`# syntax=...`) are comments here.
    """
    instructions: list[tuple[str, str]] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def strip_flags(args: str) -> tuple[list[str], str]:
    """Split leading `--flag=value` options (RUN --mount, COPY --chown/--from) from the rest."""
    flags = []
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.lstrip()
    return flags, rest


def lock_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.lock"
    return match.group(1)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def runs(instructions) -> list[str]:
    return [strip_flags(args)[1] for keyword, args in instructions if keyword == "RUN"]


def env_of(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[key] = value
    return env


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_parser_joins_continuations_and_skips_comments():
    text = '# syntax=docker/dockerfile:1\nFROM a:1\n\nRUN one \\\n  # a comment\n  && two\nCMD ["x"]\n'
    assert parse_dockerfile(text) == [("FROM", "a:1"), ("RUN", "one && two"), ("CMD", '["x"]')]


def test_dockerfile_base_is_the_gpu_image_of_the_locked_tensorflow(dockerfile):
    version = lock_version("tensorflow-cpu")
    froms = [args for keyword, args in dockerfile if keyword == "FROM"]
    assert len(froms) == 1, froms
    image = strip_flags(froms[0])[1].split()[0]
    assert image == f"tensorflow/tensorflow:{version}-gpu"


def test_dockerfile_installs_the_lock_without_tensorflow_cpu(dockerfile):
    version = lock_version("tensorflow-cpu")
    copied_lock = next(
        (
            i
            for i, (k, a) in enumerate(dockerfile)
            if k == "COPY" and "requirements.lock" in strip_flags(a)[1].split()[:-1]
        ),
        None,
    )
    assert copied_lock is not None, "requirements.lock is never copied into the image"

    install = next((i for i, (k, a) in enumerate(dockerfile) if k == "RUN" and "requirements.lock" in a), None)
    assert install is not None and install > copied_lock
    script = strip_flags(dockerfile[install][1])[1]
    match = re.search(r"grep -v '\^tensorflow-cpu==' requirements\.lock > (\S+)", script)
    assert match, f"the lock is not filtered with grep -v '^tensorflow-cpu==': {script}"
    filtered = match.group(1)
    assert re.search(rf"uv pip install\b.*\s-r {re.escape(filtered)}(\s|$)", script), script
    assert f'"tensorflow[and-cuda]=={version}"' in script or f"tensorflow[and-cuda]=={version}" in script.split()

    # what that filter leaves of the real lock: every pin but tensorflow-cpu
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    kept = [line for line in lines if not line.startswith("tensorflow-cpu==")]
    pins = {line.split("==")[0] for line in kept if "==" in line and not line.startswith((" ", "#"))}
    assert "tensorflow-cpu" not in pins
    assert {"prefect", "dvc", "dvc-s3", "keras", "boto3"} <= pins
    assert len(kept) == len(lines) - 1


def test_dockerfile_installs_the_project_without_deps_after_copying_it(dockerfile):
    copied = []
    for keyword, args in dockerfile:
        if keyword == "COPY":
            copied += strip_flags(args)[1].split()[:-1]
        if keyword == "RUN" and re.search(r"pip install\b.*--no-deps\b.*-e \.", args):
            break
    else:
        pytest.fail("no `pip install --no-deps -e .` in the Dockerfile")
    for needed in ("pyproject.toml", "README.md", "resnet_pipeline/"):  # README: pyproject's readme
        assert needed in copied, f"{needed} is not copied before the project is installed"


def test_dockerfile_copies_only_existing_paths_and_the_pipeline_files(dockerfile):
    sources = []
    for keyword, args in dockerfile:
        if keyword in ("COPY", "ADD"):
            flags, rest = strip_flags(args)
            if any(flag.startswith("--from") for flag in flags):
                continue
            sources += rest.split()[:-1]
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"COPY sources missing from the repository: {missing}"
    for needed in ("flows/", "dvc.yaml", "params.yaml", "prefect.yaml", ".dvc/config"):
        assert needed in sources


def test_dockerfile_workdir_env_and_tools(dockerfile):
    assert [args for keyword, args in dockerfile if keyword == "WORKDIR"][-1] == "/project"
    env = env_of(dockerfile)
    assert env.get("TF_CPP_MIN_LOG_LEVEL") == "2"
    scripts = " ".join(runs(dockerfile))
    assert re.search(r"apt-get install\b[^&]*\bgit\b", scripts), "git is not installed (pull steps clone)"
    assert re.search(r"pip install\b[^&]*\buv\b", scripts), "uv is not installed"
    lock_version("dvc")  # dvc (pull steps: dvc pull) comes with the lock


def test_dockerfile_cmd_starts_a_worker_on_the_deployments_pool(dockerfile):
    cmds = [args for keyword, args in dockerfile if keyword == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])  # exec form: a JSON array
    assert isinstance(cmd, list) and all(isinstance(part, str) for part in cmd)
    assert cmd[:3] == ["prefect", "worker", "start"]
    pool = cmd[cmd.index("--pool") + 1]
    assert cmd[cmd.index("--type") + 1] == "process"

    prefect_yaml = ROOT / "prefect.yaml"
    if not prefect_yaml.exists():
        pytest.skip("prefect.yaml is not in the repository yet")
    deployments = yaml.safe_load(prefect_yaml.read_text())["deployments"]
    assert deployments
    assert {d["work_pool"]["name"] for d in deployments} == {pool}


# --------------------------------------------------------------------------- Kubernetes manifest


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs) == 4, [doc["kind"] for doc in docs]
    assert set(by_kind) == {"Service", "Job", "PersistentVolumeClaim", "NetworkPolicy"}
    return by_kind


def _container(manifest) -> dict:
    containers = manifest["Job"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _script(manifest) -> tuple[list[str], str, str]:
    """(command, the whole `sh -c` script, its resnet-pipeline line)."""
    container = _container(manifest)
    command, args = container["command"], container.get("args", [])
    assert command[-1] == "-c" and Path(command[0]).name in ("sh", "bash"), command
    assert len(args) == 1
    script = args[0]
    lines = [line for line in script.splitlines() if re.match(r"\s*(exec\s+)?resnet-pipeline\b", line)]
    assert len(lines) == 1, script
    return command, script, lines[0]


def _tf_config(manifest, index: int) -> str:
    """Run the container's script with JOB_COMPLETION_INDEX=index, `printenv TF_CONFIG` for the trainer."""
    command, script, trainer = _script(manifest)
    probe = script.replace(trainer, "printenv TF_CONFIG")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JOB_COMPLETION_INDEX": str(index)}
    done = subprocess.run([*command, probe], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _workers(manifest) -> list[str]:
    return json.loads(_tf_config(manifest, 0))["cluster"]["worker"]


def test_manifest_service_is_headless_and_selects_the_job_pods(manifest):
    service, job = manifest["Service"], manifest["Job"]
    assert service["spec"]["clusterIP"] == "None"
    selector = service["spec"]["selector"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


def test_manifest_ports_agree(manifest):
    service_ports = manifest["Service"]["spec"]["ports"]
    assert len(service_ports) == 1 and service_ports[0]["name"] == "tf"
    port = service_ports[0]["port"]
    assert service_ports[0].get("targetPort", port) == port
    assert [p["containerPort"] for p in _container(manifest)["ports"]] == [port]
    assert {address.rsplit(":", 1)[1] for address in _workers(manifest)} == {str(port)}


def test_manifest_worker_addresses_are_the_job_pods(manifest):
    job, service = manifest["Job"], manifest["Service"]
    spec = job["spec"]
    workers = _workers(manifest)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == len(workers) >= 2
    name, subdomain = job["metadata"]["name"], service["metadata"]["name"]
    assert workers == [f"{name}-{i}.{subdomain}:{service['spec']['ports'][0]['port']}" for i in range(len(workers))]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" or "backoffLimitPerIndex" in spec


def _job_pod_labels(job: dict) -> dict:
    """The labels every pod of the Job carries: its template's, and the Job controller's own."""
    return {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}


def test_manifest_network_policy_admits_only_the_job_pods_to_the_worker_port(manifest):
    """TensorFlow's gRPC server runs whatever a client sends: only the job's own workers may reach it."""
    policy, job, service = manifest["NetworkPolicy"], manifest["Job"], manifest["Service"]
    spec = policy["spec"]
    labels = _job_pod_labels(job)
    selected = spec["podSelector"].get("matchLabels", {})
    assert selected and selected.items() <= labels.items(), "the policy does not select the job's pods"
    assert "matchExpressions" not in spec["podSelector"]
    assert "Ingress" in spec["policyTypes"]

    rules = spec.get("ingress", [])
    assert len(rules) == 1, "one rule: the job's pods, on the TensorFlow port"
    (rule,) = rules
    assert rule.get("from"), "a rule without `from` admits every source"
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, f"only pods of this namespace may be admitted: {peer}"
        admitted = peer["podSelector"].get("matchLabels", {})
        assert admitted and "matchExpressions" not in peer["podSelector"]
        assert admitted.items() <= labels.items(), f"{admitted} admits pods that are not the job's"
        assert admitted.get("batch.kubernetes.io/job-name") == job["metadata"]["name"], (
            "pods of another job with the same app label would be admitted"
        )
    port = service["spec"]["ports"][0]["port"]
    assert rule.get("ports") == [{"protocol": "TCP", "port": port}]
    assert {address.rsplit(":", 1)[1] for address in _workers(manifest)} == {str(port)}


@pytest.mark.parametrize("index", [0, 1])
def test_manifest_tf_config_is_what_the_trainer_reads(manifest, index):
    from resnet_pipeline.training.strategy import Cluster, read_tf_config

    raw = _tf_config(manifest, index)
    workers = manifest["Job"]["spec"]["completions"]
    assert read_tf_config({"TF_CONFIG": raw}) == Cluster("worker", index, workers)
    assert read_tf_config({"TF_CONFIG": raw}).is_chief == (index == 0)
    assert json.loads(raw)["task"] == {"type": "worker", "index": index}


def test_manifest_command_is_a_multi_worker_train_the_cli_accepts(manifest):
    from resnet_pipeline import cli, config

    _, _, trainer = _script(manifest)
    argv = shlex.split(trainer)
    if argv[0] == "exec":
        argv = argv[1:]
    assert argv[0] == "resnet-pipeline"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "train" and not args.workers
    cfg = config.load(ROOT / args.params, config.parse_overrides(args.set))
    assert cfg.train.strategy == "multi_worker"


def test_manifest_image_gpu_and_shared_volume(manifest):
    container = _container(manifest)
    assert container["image"].split(":")[0] == "resnet-pipeline-gpu"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1

    pvc = manifest["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in manifest["Job"]["spec"]["template"]["spec"]["volumes"]}
    shared = [
        name
        for name, v in volumes.items()
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    assert len(shared) == 1

    # data/ and artifacts/ of params.yaml, under the working directory, are on the shared volume
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["base"]
    workdir = Path(container["workingDir"])
    mounted = {Path(m["mountPath"]) for m in container["volumeMounts"] if m["name"] == shared[0]}
    for folder in (base["data_dir"], base["artifacts_dir"]):
        target = workdir / folder
        assert any(target == m or m in target.parents for m in mounted), f"{target} is not on the shared volume"
    assert workdir not in mounted, "mounting the volume over the working directory hides the image's project"


def test_readme_uses_the_same_names():
    readme = (INFRA / "README.md").read_text()
    assert "docker build -f infra/Dockerfile -t resnet-pipeline-gpu ." in readme
    assert "kubectl apply -f infra/k8s/train-multiworker.yaml" in readme
    assert "infra/dev-s3.sh" in readme
    assert "```yaml\napiVersion" not in readme, "the manifest lives in infra/k8s/, not in the README"


# --------------------------------------------------------------------------- dev S3 server


def _weed_processes(directory: Path) -> list[int]:
    """Pids of processes whose command line names `-dir=<directory>` (our weed mini)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"-dir={directory}".encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_dev_s3_script_shape():
    assert os.access(DEV_S3, os.X_OK)
    lines = DEV_S3.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert "infra/devs3.py" in DEV_S3.read_text()


@pytest.mark.server
@pytest.mark.timeout(240)
def test_dev_s3_serves_until_sigterm(tmp_path):
    import boto3
    from botocore.config import Config

    data = tmp_path / "s3"
    proc = subprocess.Popen(
        [str(DEV_S3), "--dir", str(data), "--bucket", "dev"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        exports, output = {}, []
        deadline = time.monotonic() + 90
        while not output or not output[-1].startswith("serving"):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no 'serving' line within 90 s; stdout so far: {output}")
            if line is None:
                pytest.fail(f"dev-s3.sh exited ({proc.wait()}): {output}\n{proc.stderr.read()}")
            output.append(line.rstrip("\n"))
            if output[-1].startswith("export "):
                key, _, value = shlex.split(output[-1][len("export ") :])[0].partition("=")
                exports[key] = value
        assert set(exports) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
        assert any(exports["AWS_ENDPOINT_URL"] in line for line in output if "endpoint" in line.lower())
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert _weed_processes(data), "no weed process serving the given --dir"

        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
            region_name=exports["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )
        s3.put_object(Bucket="dev", Key="hello.txt", Body=b"hello dev")
        assert s3.get_object(Bucket="dev", Key="hello.txt")["Body"].read() == b"hello dev"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            for pid in _weed_processes(data):
                os.kill(pid, signal.SIGKILL)
            pytest.fail("dev-s3.sh did not exit within 30 s of SIGTERM")
    assert code == 0, proc.stderr.read()
    deadline = time.monotonic() + 5
    while _weed_processes(data) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _weed_processes(data), "weed is still running after dev-s3.sh exited"
    assert data.is_dir(), "--dir must be kept on exit"
