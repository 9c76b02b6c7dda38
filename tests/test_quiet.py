"""Quiet by default: a train stage (the one that checkpoints and exports, where absl and TensorFlow
talk most) prints the pipeline's own lines and no framework INFO line; `-v` brings them back.

Both runs are `resnet-pipeline train` in a subprocess (the two at once), one epoch of ResNet-20 on the digits
(8x8), with TF_CPP_MIN_LOG_LEVEL unset (as a user's shell), so that the CLI's own logging setup is what is tested.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.project import train_project

pytestmark = pytest.mark.slow  # two train runs in subprocesses

BIN = Path(sys.executable).parent

# absl's C++ log format (`I1201 12:00:00.000000 pid file.cc:1] ...`, or `I0000 00:00:...` before
# absl is initialised), TensorFlow's own C++ format, and the Python absl/tensorflow loggers'
FRAMEWORK_INFO = re.compile(r"^I\d{4} |\bI tensorflow/| INFO (absl|tensorflow): |Sharding callback")
# TensorFlow's start-up notice, written before TF_CPP_MIN_LOG_LEVEL is read (see resnet_pipeline/logs.py)
BANNER = re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on")


def _train_both(base: Path, digits_data) -> tuple[list[str], list[str]]:
    """The quiet run and the `-v` run at the same time, each in a folder of its own (a run holds its
    folder's lock); their stderr lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CONFIG")}
    sets = ["train.epochs=1", "train.image_size=8", "train.pad_crop=2", "train.checkpoint_every_steps=10"]
    procs = []
    for flags in ([], ["-v"]):
        work = train_project(base / f"run{len(flags)}", digits_data)
        cmd = [str(BIN / "resnet-pipeline"), *flags, "train", *(a for s in sets for a in ("--set", s))]
        procs.append(
            subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    lines = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-5000:]
        lines.append(stderr.splitlines())
    return lines[0], lines[1]


def test_train_prints_no_framework_info_and_verbose_does(digits_data, tmp_path):
    quiet, verbose = _train_both(tmp_path, digits_data)
    chatter = [line for line in quiet if FRAMEWORK_INFO.search(line) and not BANNER.search(line)]
    assert chatter == [], "\n".join(chatter)
    assert any(" INFO resnet_pipeline.training" in line for line in quiet), "the pipeline's own lines stay"
    assert not any("renamed" in line or "input_0, input_2" in line for line in quiet), "the export's name list"

    framework = [line for line in verbose if FRAMEWORK_INFO.search(line) and not BANNER.search(line)]
    assert any("Sharding callback duration" in line for line in framework), "\n".join(verbose[-50:])
    assert any(re.match(r"^I\d{4} ", line) for line in framework), "TensorFlow's C++ INFO lines with -v"
