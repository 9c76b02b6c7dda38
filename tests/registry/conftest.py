"""Registries to test against: a local folder, and S3 on the session's SeaweedFS (a bucket per test).

The S3 registry gets its credentials and endpoint the way users give them, from the environment
(boto3's standard chain, AWS_ENDPOINT_URL), so spawned processes inherit them too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

NAME = "resnet-digits"


@pytest.fixture
def s3_location(s3_server, monkeypatch) -> str:
    """`s3://<a new bucket>/registry`, with the server's credentials and endpoint in the environment."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_server.make_bucket(f"reg-{uuid.uuid4().hex[:16]}")
    return f"s3://{bucket}/registry"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def location(request, tmp_path) -> str:
    """A registry location of each backend."""
    if request.param == "s3":
        return request.getfixturevalue("s3_location")
    return str(tmp_path / "registry")


def make_files(
    folder: Path, *, model_bytes: bytes = b"PK\x03\x04 model " + bytes(range(256)) * 64, top1: float = 0.5
) -> dict[str, Path]:
    """Small stand-ins for the files of a version (the registry does not read model.keras)."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "model.keras": model_bytes,
        "params.yaml": b"train:\n  epochs: 3\n",
        "labels.json": b'{"classes": ["0", "1"]}\n',
        "metrics.json": json.dumps({"test": {"top1": top1}}).encode(),
    }
    out = {}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def make_run(
    folder: Path, *, top1: float, loss: float = 1.0, split: bytes = b"split A", saved_model: bool = True
) -> dict[str, Path]:
    """A train + evaluate output: model_dir (model.keras, params.yaml, labels.json, saved_model/),
    eval_dir (metrics.json) and a data manifest whose sha256 names the test split."""
    model_dir, eval_dir = folder / "model", folder / "eval"
    make_files(model_dir)
    (model_dir / "metrics.json").unlink()
    if saved_model:
        (model_dir / "saved_model" / "variables").mkdir(parents=True)
        (model_dir / "saved_model" / "saved_model.pb").write_bytes(b"\x08\x01 graph")
        (model_dir / "saved_model" / "variables" / "variables.index").write_bytes(b"index")
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps({"test": {"top1": top1, "loss": loss, "examples": 10}}))
    (folder / "manifest.parquet").write_bytes(split)
    return {
        "model_dir": model_dir,
        "eval_dir": eval_dir,
        "data_manifest": folder / "manifest.parquet",
        "out": folder / "registered.json",
    }
