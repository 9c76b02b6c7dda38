"""Commands that do not train, evaluate, export or predict never import TensorFlow (it costs ~7 s of
start-up and prints its banner): download, split and shard on the digits, and the registry's
list and show, each run in a fresh interpreter that reports `sys.modules` at exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import atexit, json, sys
from resnet_pipeline import cli
atexit.register(lambda: print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules})))
code = cli.main(sys.argv[1:])
sys.stdout.flush()
raise SystemExit(code)
"""


def _run(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_data_and_registry_commands_do_not_import_tensorflow(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for stage in ("download", "split", "shard"):
        assert _run([stage], tmp_path) == {"tensorflow": False, "keras": False}, stage
    from resnet_pipeline.registry import open_registry

    source = tmp_path / "model.keras"
    source.write_bytes(b"stand-in model bytes")
    open_registry(tmp_path / "registry").register(
        "resnet-digits", {"model.keras": source}, {"metrics": {"test": {"top1": 0.5}}}
    )
    for args in (["registry", "list"], ["registry", "show", "resnet-digits"]):
        assert _run(args, tmp_path) == {"tensorflow": False, "keras": False}, args
