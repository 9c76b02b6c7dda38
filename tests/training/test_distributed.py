"""Distributed, fault-tolerant training on this CPU: real strategies, real processes, real signals.

Each run is `resnet-pipeline train` in a subprocess (logical CPU devices and
MultiWorkerMirroredStrategy must be set up before TensorFlow starts, which a pytest process that
already ran TensorFlow cannot do), on the digits shards: 1,419 training images, 22 steps of 64 per
epoch.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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


def _train(
    work: Path, sets: list[str], workers: int = 0, timeout: int = 600, verbose: bool = False
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(sets, workers, verbose), cwd=work, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"train {sets} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture
def work(digits_data, tmp_path) -> Path:
    """A project folder holding params.yaml and the digits shards and labels."""
    folder = tmp_path / "work"
    (folder / "data").mkdir(parents=True)
    shutil.copytree(digits_data.shards, folder / "data/shards")
    shutil.copy(digits_data.labels, folder / "data/labels.json")
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    return folder


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


def test_two_replicas_and_two_workers_match_one_device_step_by_step(work):
    common = ["train.epochs=1", "train.image_size=16", *DETERMINISTIC]
    _train(work, [*common, "train.strategy=one_device", "base.artifacts_dir=one"])
    _train(work, [*common, "train.strategy=mirrored", "train.cpu_devices=2", "base.artifacts_dir=mirrored"])
    launched = _train(work, [*common, "base.artifacts_dir=workers"], workers=2)
    assert "[worker0]" in launched.stdout and "[worker1]" in launched.stdout

    one = _steps(work / "one/model")
    assert len(one) == STEPS_PER_EPOCH
    for name, replicas, strategy in (
        ("mirrored", 2, "MirroredStrategy"),
        ("workers", 2, "MultiWorkerMirroredStrategy"),
    ):
        summary = json.loads((work / name / "model/train.json").read_text())
        assert (summary["replicas"], summary["strategy"]) == (replicas, strategy)
        other = _steps(work / name / "model")
        assert [r["step"] for r in other] == [r["step"] for r in one]
        for a, b in zip(one[:20], other[:20]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"{name}, step {a['step']:.0f}"
    # the chief alone writes the TensorBoard logs
    assert len(list((work / "workers/tensorboard").glob("*/events.out.tfevents.*"))) == 1


def test_sigkill_at_a_random_step_resumes_to_the_same_weights(work):
    common = ["train.epochs=2", "train.checkpoint_every_steps=3", *DETERMINISTIC]
    _train(work, [*common, "base.artifacts_dir=reference"])
    reference = _weights(work / "reference/model")

    proc = subprocess.Popen(_cmd(common), cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(proc, work / "artifacts/checkpoints", 3 * random.randint(2, 10))
    time.sleep(random.random())  # a random step after that checkpoint
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (work / "artifacts/model").exists()

    resumed = _train(work, common)
    assert "resuming from" in resumed.stderr
    summary = json.loads((work / "artifacts/model/train.json").read_text())
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert [r["step"] for r in _steps(work / "artifacts/model")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for a, b in zip(reference, _weights(work / "artifacts/model")):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_sigterm_saves_at_the_step_and_resumes_with_no_lost_step(work):
    common = ["train.epochs=2", f"train.checkpoint_every_steps={STEPS_PER_EPOCH}", *DETERMINISTIC]
    _train(work, [*common, "base.artifacts_dir=reference"])
    reference_steps = _steps(work / "reference/model")

    ckpt_root = work / "artifacts/checkpoints"
    proc = subprocess.Popen(
        _cmd(common), cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(proc, ckpt_root, STEPS_PER_EPOCH)  # the end of epoch 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert STEPS_PER_EPOCH < stopped < 2 * STEPS_PER_EPOCH
    assert _checkpointed_step(ckpt_root) == stopped  # saved at the step it stopped, not at an older one

    resumed = _train(work, common)
    assert f"at step {stopped} of {2 * STEPS_PER_EPOCH}" in resumed.stderr
    steps = _steps(work / "artifacts/model")
    assert [r["step"] for r in steps] == [r["step"] for r in reference_steps]
    for a, b in zip(reference_steps, steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']:.0f}"


@pytest.mark.parametrize(
    "sets",
    [
        pytest.param(["train.precision=mixed_float16"], id="mixed_float16"),
        pytest.param(["train.precision=mixed_bfloat16"], id="mixed_bfloat16"),
        pytest.param(["train.jit_compile=true"], id="xla"),
        pytest.param(["train.jit_compile=true", "train.strategy=mirrored", "train.cpu_devices=2"], id="xla-mirrored"),
    ],
)
def test_mixed_precision_and_xla_complete_an_epoch(work, sets):
    _train(work, ["train.epochs=1", *TINY, *sets])
    summary = json.loads((work / "artifacts/model/train.json").read_text())
    assert summary["steps"] == STEPS_PER_EPOCH
    losses = [r["loss"] for r in _steps(work / "artifacts/model")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (work / "artifacts/model/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_dead_worker_fails_the_run_in_bounded_time_and_a_restart_resumes(work):
    common = ["train.epochs=2", "train.checkpoint_every_steps=4", "train.summary_every_steps=1"]
    ckpt_root = work / "artifacts/checkpoints"
    launcher = subprocess.Popen(
        _cmd(common, workers=2), cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
