"""Distributed, fault-tolerant training on this CPU: real strategies, real processes, real signals.

Each run is `resnet-pipeline train` in a subprocess (logical CPU devices and
MultiWorkerMirroredStrategy must be set up before TensorFlow starts, which a pytest process that
already ran TensorFlow cannot do), but for the one-device precision and XLA epochs, which train in
the test process; on the digits shards: 1,419 training images, 22 steps of 64 per
epoch.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
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


def test_a_dead_worker_fails_the_run_in_bounded_time_and_a_restart_resumes(work):
    common = ["train.epochs=2", "train.checkpoint_every_steps=4", "train.summary_every_steps=1"]
    ckpt_root = work / "artifacts/checkpoints"
    launcher = _start(work, common, workers=2)
    _wait_for_checkpoint(launcher, ckpt_root, 8)
    saved = _checkpointed_step(ckpt_root)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # worker 1 dies; worker 0 is blocked in a collective with it
    killed = time.monotonic()
    stdout, stderr = launcher.communicate(timeout=180)
    elapsed = time.monotonic() - killed
    assert launcher.returncode != 0
    assert elapsed < 120, f"the run took {elapsed:.0f} s to fail"
    assert "worker1 exited with code -9" in stderr
    assert not (work / "artifacts/model").exists()
    assert "Sharding callback" not in stdout, "the workers are quiet about the frameworks by default"

    resumed = _train(work, common, workers=2, verbose=True)
    assert "resuming from" in resumed.stdout
    # -v reaches the workers: their checkpoints' absl INFO lines come through the launcher
    assert any(line.startswith("[worker0]") and "Sharding callback" in line for line in resumed.stdout.splitlines())
    summary = json.loads((work / "artifacts/model/train.json").read_text())
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["workers"] == 2
    assert _steps(work / "artifacts/model")[0]["step"] == 1
    assert saved >= 8
