"""Distributed, fault-tolerant training on this CPU: real strategies, real processes, real signals.

Each run is `resnet-pipeline train` in a subprocess (logical CPU devices and
MultiWorkerMirroredStrategy must be set up before TensorFlow starts, which a pytest process that
already ran TensorFlow cannot do), but for the one-device precision and XLA epochs, which train in
the test process; on the digits shards: 1,419 training images, 22 steps of 64 per
epoch.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.project import train_project

pytestmark = pytest.mark.slow  # every test trains in subprocesses

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 22

# Deterministic mode. zero_init_residual starts each block as an identity: without it, ResNet-20's
# first gradients are so ill-conditioned in float32 (2 % from float64's) that any change of
# summation order, even the same device with another convolution library, drifts past 1e-3 in a
# few steps.
DETERMINISTIC = [
    "train.deterministic=true",
    "train.sync_bn=true",
    "train.zero_init_residual=true",
    "train.lr=0.01",
    "train.lr_schedule=constant",
    "train.warmup_epochs=0",
    "train.summary_every_steps=1",
]  # a steps.csv row per step, to compare step by step


# The digits at their own 8x8 (the crop's padding in proportion: 2 of 8 as 4 of 32) for tests whose
# claim does not hang on the step's cost: a sixteenth of 32 pixels' compute (float16 convolutions,
# emulated on a CPU, most of all). Not for the tests that signal a run at a step: their timing
# wants steps that take a while.
TINY = ["train.image_size=8", "train.pad_crop=2"]


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("TF_CONFIG", None)
    return env


def _cmd(sets: list[str], workers: int = 0, verbose: bool = False) -> list[str]:
    cmd = [str(BIN / "resnet-pipeline"), *(["-v"] if verbose else []), "train"]
    if workers:
        cmd += ["--workers", str(workers)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def _start(work: Path, sets: list[str], workers: int = 0, verbose: bool = False, **popen) -> subprocess.Popen:
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(_cmd(sets, workers, verbose), cwd=work, env=_env(), **options)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _train(
    work: Path, sets: list[str], workers: int = 0, timeout: int = 600, verbose: bool = False
) -> subprocess.CompletedProcess:
    return _finish(_start(work, sets, workers, verbose), timeout)


def _skip_without_a_namespace() -> None:
    """`train --workers` refuses to start where its workers cannot have a network namespace of their own."""
    from resnet_pipeline.training.launch import LoopbackNamespace, NamespaceError

    try:
        with LoopbackNamespace():
            pass
    except NamespaceError as err:
        pytest.skip(f"no `train --workers` here: {err}")


def _train_together(runs: list[tuple[Path, list[str], int]]) -> list[subprocess.CompletedProcess]:
    """Independent runs (project folder, sets, workers) at the same time, each in a folder of its own
    (a run holds its folder's lock): TensorFlow's import and tracing take one core, and small steps
    leave the other one mostly idle."""
    return [_finish(proc) for proc in [_start(work, sets, workers) for work, sets, workers in runs]]


@pytest.fixture
def work(digits_data, tmp_path) -> Path:
    return train_project(tmp_path / "work", digits_data)


# The reference of the SIGKILL and SIGTERM tests: the deterministic 2 epochs they resume to, trained
# once. The checkpoint cadence is not in the run's numbers (the SIGTERM test saves every epoch and
# matches this run's losses to 1e-5).
RESUMED = ["train.epochs=2", *DETERMINISTIC]


@pytest.fixture(scope="module")
def reference(digits_data, tmp_path_factory):
    """The reference run, started in the background when first asked for (it trains beside the
    run the asking test kills); `reference()` waits for it and gives its model folder."""
    work = train_project(tmp_path_factory.mktemp("reference"), digits_data)
    proc = _start(work, [*RESUMED, "train.checkpoint_every_steps=3"])
    done: list[Path] = []

    def model_dir() -> Path:
        if not done:
            _finish(proc)
            done.append(work / "artifacts/model")
        return done[0]

    yield model_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _steps(model_dir: Path) -> list[dict]:
    with open(model_dir / "steps.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _weights(model_dir: Path) -> list[np.ndarray]:
    import keras

    from resnet_pipeline.models import resnet  # registers the custom layers

    with resnet.recursion_limit():
        model = keras.saving.load_model(model_dir / "model.keras", safe_mode=True)
    return [w.numpy() for w in model.weights]


def _checkpointed_step(ckpt_root: Path) -> int:
    saved = list(ckpt_root.glob("*/ckpt-*.index"))
    return max((int(p.name.split("-")[1].split(".")[0]) for p in saved), default=0)


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt_root: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and _checkpointed_step(ckpt_root) < step:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the checkpoint the test waits for"
    assert _checkpointed_step(ckpt_root) >= step, f"no checkpoint of step {step} within {timeout} s"


def test_two_replicas_and_two_workers_match_one_device_step_by_step(digits_data, tmp_path):
    _skip_without_a_namespace()
    common = ["train.epochs=1", "train.image_size=16", *DETERMINISTIC]
    work = {name: train_project(tmp_path / name, digits_data) for name in ("one", "mirrored", "workers")}
    *_, launched = _train_together(
        [
            (work["one"], [*common, "train.strategy=one_device"], 0),
            (work["mirrored"], [*common, "train.strategy=mirrored", "train.cpu_devices=2"], 0),
            (work["workers"], common, 2),
        ]
    )
    assert "[worker0]" in launched.stdout and "[worker1]" in launched.stdout

    one = _steps(work["one"] / "artifacts/model")
    assert len(one) == STEPS_PER_EPOCH
    for name, replicas, strategy in (
        ("mirrored", 2, "MirroredStrategy"),
        ("workers", 2, "MultiWorkerMirroredStrategy"),
    ):
        summary = json.loads((work[name] / "artifacts/model/train.json").read_text())
        assert (summary["replicas"], summary["strategy"]) == (replicas, strategy)
        other = _steps(work[name] / "artifacts/model")
        assert [r["step"] for r in other] == [r["step"] for r in one]
        for a, b in zip(one[:20], other[:20]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"{name}, step {a['step']:.0f}"
    # the chief alone writes the TensorBoard logs
    assert len(list((work["workers"] / "artifacts/tensorboard").glob("*/events.out.tfevents.*"))) == 1


def test_sigkill_at_a_random_step_resumes_to_the_same_weights(work, reference):
    common = [*RESUMED, "train.checkpoint_every_steps=3"]
    proc = _start(work, common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(proc, work / "artifacts/checkpoints", 3 * random.randint(2, 10))
    time.sleep(random.random())  # a random step after that checkpoint
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (work / "artifacts/model").exists()

    resumed = _train(work, common)
    assert "resuming from" in resumed.stderr
    # every step of the 2 epochs trained once: no step lost to the kill, none trained twice
    summary = json.loads((work / "artifacts/model/train.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH == 2 * summary["steps_per_epoch"]
    assert [r["step"] for r in _steps(work / "artifacts/model")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    history = (work / "artifacts/model/history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1"]
    for a, b in zip(_weights(reference()), _weights(work / "artifacts/model")):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_sigterm_saves_at_the_step_and_resumes_with_no_lost_step(work, reference):
    common = [*RESUMED, f"train.checkpoint_every_steps={STEPS_PER_EPOCH}"]
    ckpt_root = work / "artifacts/checkpoints"
    proc = _start(work, common, stdout=subprocess.DEVNULL)
    _wait_for_checkpoint(proc, ckpt_root, STEPS_PER_EPOCH)  # the end of epoch 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert STEPS_PER_EPOCH < stopped < 2 * STEPS_PER_EPOCH
    assert _checkpointed_step(ckpt_root) == stopped  # saved at the step it stopped, not at an older one

    resumed = _train(work, common)
    assert f"at step {stopped} of {2 * STEPS_PER_EPOCH}" in resumed.stderr
    reference_steps = _steps(reference())
    steps = _steps(work / "artifacts/model")
    assert [r["step"] for r in steps] == [r["step"] for r in reference_steps]
    for a, b in zip(reference_steps, steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']:.0f}"


GPU_PATHS = {
    "mixed_float16": ["train.precision=mixed_float16"],
    "mixed_bfloat16": ["train.precision=mixed_bfloat16"],
    "xla": ["train.jit_compile=true"],
    "xla-mirrored": ["train.jit_compile=true", "train.strategy=mirrored", "train.cpu_devices=2"],
}


SUBPROCESS_ONLY = {"xla-mirrored"}  # two logical CPU devices: set before TensorFlow starts


@pytest.fixture(scope="module")
def gpu_path_runs(digits_data, tmp_path_factory) -> dict[str, Path]:
    """One epoch of each GPU code path; their model folders by name. xla-mirrored trains in a
    subprocess, in the background, while the others train here, one after the other (nothing in
    their claim needs a process of their own); the global dtype policy is float32 again after."""
    import keras

    from resnet_pipeline.config import load, parse_overrides
    from resnet_pipeline.training.loop import train

    base = tmp_path_factory.mktemp("gpu-paths")
    work = {name: train_project(base / name, digits_data) for name in GPU_PATHS}
    sets = {name: ["train.epochs=1", *TINY, *more] for name, more in GPU_PATHS.items()}
    background = {name: _start(work[name], sets[name]) for name in SUBPROCESS_ONLY}
    try:
        for name in [name for name in GPU_PATHS if name not in SUBPROCESS_ONLY]:
            cfg = load(work[name] / "params.yaml", parse_overrides(sets[name]))
            paths = work[name] / "data", work[name] / "artifacts"
            train(cfg.train, cfg, paths[0] / "shards", paths[0] / "labels.json", paths[1] / "model", paths[1] / "ckpt")
    finally:
        keras.mixed_precision.set_global_policy("float32")
        for proc in background.values():
            _finish(proc)
    return {name: work[name] / "artifacts/model" for name in GPU_PATHS}


@pytest.mark.parametrize("name", list(GPU_PATHS))
def test_mixed_precision_and_xla_complete_an_epoch(gpu_path_runs, name):
    model_dir = gpu_path_runs[name]
    summary = json.loads((model_dir / "train.json").read_text())
    assert summary["steps"] == STEPS_PER_EPOCH
    losses = [r["loss"] for r in _steps(model_dir)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (model_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _worker_pids(launcher: subprocess.Popen, count: int = 2, timeout: float = 60) -> list[int]:
    """The launcher's workers (its children running `python -m resnet_pipeline ...`), once all started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        workers = [pid for pid in _children(launcher.pid) if _argv(pid)[1:3] == ["-m", "resnet_pipeline"]]
        if len(workers) == count:
            return workers
        time.sleep(0.05)
    if launcher.poll() is not None:
        pytest.fail(f"the launcher exited ({launcher.returncode}): {launcher.communicate()[1][-3000:]}")
    pytest.fail(f"the launcher did not start {count} workers within {timeout} s")


def _worker_port(pid: int) -> int:
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    spec = json.loads(environ["TF_CONFIG"])
    return int(spec["cluster"]["worker"][spec["task"]["index"]].rsplit(":", 1)[1])


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of each TCP socket `pid` listens on, as its network namespace sees them."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # LISTEN
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _network_namespace(pid: int) -> tuple[int, list[str]]:
    """(inode of the network namespace of `pid`, the interfaces in it)."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return os.stat(f"/proc/{pid}/ns/net").st_ino, [line.split(":")[0].strip() for line in lines]


PROBE = """
import socket, sys
host, ports = sys.argv[1], sys.argv[2:]
for port in ports:
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        print(port, "open")
    except OSError as err:
        print(port, type(err).__name__)
"""


def _veth_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root: a network namespace and a veth pair need CAP_NET_ADMIN"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2) to make a network namespace and a veth pair"
    return None


def _connect_from_another_namespace(ports: list[int]) -> dict[int, str]:
    """Connect to each port on this host's side of a veth pair, from a new network namespace at its
    other end; {port: "open" or the error}. A listener of the test on the same address must be
    reachable (the pair works), or the test fails."""
    tag = f"rpt{os.getpid() % 100000}"
    net = f"10.213.{os.getpid() % 250}"
    host_if, peer_if = f"{tag}h", f"{tag}n"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", tag)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", tag)
        ip("addr", "add", f"{net}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", tag, "addr", "add", f"{net}.2/30", "dev", peer_if)
        ip("-n", tag, "link", "set", peer_if, "up")
        with socket.create_server((f"{net}.1", 0)) as control:
            control_port = control.getsockname()[1]
            probe = [sys.executable, "-c", PROBE, f"{net}.1", str(control_port), *map(str, ports)]
            done = subprocess.run(
                ["ip", "netns", "exec", tag, *probe],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 0, done.stderr
        results = {int(port): result for port, result in (line.split() for line in done.stdout.splitlines())}
        assert results.pop(control_port) == "open", "the veth pair does not carry connections"
        return results
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", tag], capture_output=True)


def _check_workers_reachable_only_locally(workers: list[int]) -> str | None:
    """Every listening socket of the workers is on loopback or in a namespace with loopback only, and
    the workers' ports refuse a connection from another namespace; the reason if that probe cannot run."""
    ports = [_worker_port(pid) for pid in workers]
    deadline = time.monotonic() + 180
    while not all(port in {p for _, p in _listening(pid)} for pid, port in zip(workers, ports)):
        assert time.monotonic() < deadline, f"the workers do not listen on {ports} within 180 s"
        time.sleep(0.2)
    host_namespace = os.stat("/proc/self/ns/net").st_ino
    for pid in workers:
        namespace, interfaces = _network_namespace(pid)
        private = namespace != host_namespace and interfaces == ["lo"]
        for address, port in _listening(pid):
            assert private or _is_loopback(address), (
                f"worker pid {pid} listens on {address}:{port} in a network namespace with {interfaces}"
            )
    if reason := _veth_unavailable():
        return reason
    assert _connect_from_another_namespace(ports) == dict.fromkeys(ports, "ConnectionRefusedError")
    return None


def test_a_dead_worker_fails_the_run_in_bounded_time_and_a_restart_resumes(work):
    """And while the workers run: they are reachable only from this machine, and the launcher holds
    the folder (a stage fails naming it, `TF_CONFIG` or not)."""
    _skip_without_a_namespace()
    common = ["train.epochs=2", "train.checkpoint_every_steps=4", "train.summary_every_steps=1"]
    ckpt_root = work / "artifacts/checkpoints"
    launcher = _start(work, common, workers=2)
    workers = _worker_pids(launcher)
    veth_not_run = _check_workers_reachable_only_locally(workers)
    index = work / "data/shards/index.json"
    shards_before = index.stat().st_mtime_ns
    env = _env()
    env["TF_CONFIG"] = Path(f"/proc/{workers[1]}/environ").read_text().split("TF_CONFIG=")[1].split("\0")[0]
    shard = subprocess.run(
        [str(BIN / "resnet-pipeline"), "shard"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert shard.returncode != 0, "a stage ran during the multi-worker run"
    assert f"in use by resnet-pipeline train --workers 2, pid {launcher.pid}" in shard.stderr, shard.stderr
    assert index.stat().st_mtime_ns == shards_before

    _wait_for_checkpoint(launcher, ckpt_root, 8)
    saved = _checkpointed_step(ckpt_root)
    assert sorted(_worker_pids(launcher)) == sorted(workers)
    os.kill(workers[1], signal.SIGKILL)  # worker 1 dies; worker 0 is blocked in a collective with it
    killed = time.monotonic()
    stdout, stderr = launcher.communicate(timeout=180)
    elapsed = time.monotonic() - killed
    assert launcher.returncode != 0
    assert elapsed < 120, f"the run took {elapsed:.0f} s to fail"
    assert "worker1 exited with code -9" in stderr
    assert not (work / "artifacts/model").exists()
    assert "Sharding callback" not in stdout, "the workers are quiet about the frameworks by default"
    assert "names loopback addresses only" not in stdout, "the workers have loopback alone: nothing is exposed"

    resumed = _train(work, common, workers=2, verbose=True)
    assert "resuming from" in resumed.stdout
    # -v reaches the workers: their checkpoints' absl INFO lines come through the launcher
    assert any(line.startswith("[worker0]") and "Sharding callback" in line for line in resumed.stdout.splitlines())
    summary = json.loads((work / "artifacts/model/train.json").read_text())
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["workers"] == 2
    assert _steps(work / "artifacts/model")[0]["step"] == 1
    assert saved >= 8
    if veth_not_run:
        pytest.skip(f"all else passed; no connection from another network namespace was tried: {veth_not_run}")
