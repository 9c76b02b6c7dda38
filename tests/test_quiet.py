"""Quiet by default: a train stage (the one that checkpoints and exports, where absl and TensorFlow
talk most) prints the pipeline's own lines and no framework INFO line; `-v` brings them back.

Both runs are `resnet-pipeline train` in a subprocess, one epoch of ResNet-20 on the digits (8x8), with
TF_CPP_MIN_LOG_LEVEL unset (as a user's shell), so that the CLI's own logging setup is what is tested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# absl's C++ log format (`I1201 12:00:00.000000 pid file.cc:1] ...`, or `I0000 00:00:...` before
# absl is initialised), TensorFlow's own C++ format, and the Python absl/tensorflow loggers'
FRAMEWORK_INFO = re.compile(r"^I\d{4} |\bI tensorflow/| INFO (absl|tensorflow): |Sharding callback")
# TensorFlow's start-up notice, written before TF_CPP_MIN_LOG_LEVEL is read (see resnet_pipeline/logs.py)
BANNER = re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on")


@pytest.fixture(scope="module")
def work(digits_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quiet")
    (folder / "data").mkdir()
    shutil.copytree(digits_data.shards, folder / "data/shards")
    shutil.copy(digits_data.labels, folder / "data/labels.json")
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    return folder


def _train(work: Path, *flags: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CONFIG")}
    sets = ["train.epochs=1", "train.image_size=8", "train.pad_crop=2", "train.checkpoint_every_steps=10"]
    sets.append(f"base.artifacts_dir=run{len(flags)}")
    cmd = [str(BIN / "resnet-pipeline"), *flags, "train", *(a for s in sets for a in ("--set", s))]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stderr.splitlines()


def test_train_prints_no_framework_info_and_verbose_does(work):
    quiet = _train(work)
    chatter = [line for line in quiet if FRAMEWORK_INFO.search(line) and not BANNER.search(line)]
    assert chatter == [], "\n".join(chatter)
    assert any(" INFO resnet_pipeline.training" in line for line in quiet), "the pipeline's own lines stay"
    assert not any("renamed" in line or "input_0, input_2" in line for line in quiet), "the export's name list"

    verbose = _train(work, "-v")
    framework = [line for line in verbose if FRAMEWORK_INFO.search(line) and not BANNER.search(line)]
    assert any("Sharding callback duration" in line for line in framework), "\n".join(verbose[-50:])
    assert any(re.match(r"^I\d{4} ", line) for line in framework), "TensorFlow's C++ INFO lines with -v"
