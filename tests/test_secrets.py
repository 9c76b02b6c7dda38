"""A dataset URL with secrets in it (`user:pass@`, a presigned signature and a token in the query)
goes through a whole Prefect flow run, and no secret is written anywhere: not in the logs, not in
the dataset's `.complete`, the model's `params.yaml`, `registered.json`, the registry's objects
(`params.yaml`, `manifest.json`), nor in Prefect's database, artifacts and result storage.

The only place it may be is the params file the user wrote it in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from resnet_pipeline.redact import redact_text, redact_url, redact_values
from tests.httpserver import LoopbackHTTPServer

REPO = Path(__file__).resolve().parents[1]
SECRETS = ("alice-user", "hunter2-pass", "SIGSECRET0123456789", "TOKSECRET987654")


def test_redact_url_keeps_scheme_host_port_and_path_only():
    url = "https://alice:hunter2@data.example.com:8443/a/b.tar.gz?X-Amz-Signature=abc&token=t#frag"
    assert redact_url(url) == "https://data.example.com:8443/a/b.tar.gz"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("http://[::1]:8000/x?sig=1") == "http://[::1]:8000/x"
    assert redact_url("data/raw") == "data/raw"
    assert redact_url("http://u:p@host:notaport/x?sig=1") == "http://host:notaport/x"
    text = "cannot fetch 'https://u:p@h/x?sig=s' (HTTP 403)"
    assert redact_text(text) == "cannot fetch 'https://h/x' (HTTP 403)"
    assert redact_values({"download": {"url": url, "retries": 5, "mean": [0.5]}}) == {
        "download": {"url": "https://data.example.com:8443/a/b.tar.gz", "retries": 5, "mean": [0.5]}
    }


def _digits_archive(raw_digits: Path, classes=("0", "1", "2"), per_class: int = 40) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for label in classes:
            for path in sorted((raw_digits / label).iterdir())[:per_class]:
                tar.add(path, arcname=f"digits3/{label}/{path.name}")
    return buf.getvalue()


# one epoch of the digits at their own 8x8 (the crop's padding in proportion)
SMALL = {"epochs": 1, "image_size": 8, "pad_crop": 2, "checkpoint_every_steps": 1000}


def _secret_params(root: Path, url: str, sha256: str, **train) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"].update(dataset="archive", url=url, sha256=sha256, retries=1)
    params["train"].update(train)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _with_secrets(url: str) -> str:
    return url.replace("http://", f"http://{SECRETS[0]}:{SECRETS[1]}@") + (
        f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SECRETS[2]}&token={SECRETS[3]}"
    )


def test_the_download_command_names_the_url_redacted_in_its_log_and_errors(digits_data, tmp_path):
    archive = _digits_archive(digits_data.raw / "digits", per_class=5)
    cli = [str(Path(sys.executable).parent / "resnet-pipeline"), "download"]
    with LoopbackHTTPServer({"/d.tar.gz": archive}) as server:
        good, missing = _with_secrets(server.url("/d.tar.gz")), _with_secrets(server.url("/gone.tar.gz"))
        server.status["/flaky.tar.gz"] = 503
        flaky = _with_secrets(server.url("/flaky.tar.gz"))
        outputs = {}
        for name, url in (("good", good), ("missing", missing), ("flaky", flaky)):
            _secret_params(tmp_path / name, url, hashlib.sha256(archive).hexdigest())
            proc = subprocess.run(cli, cwd=tmp_path / name, capture_output=True, text=True, timeout=120)
            outputs[name] = (proc.returncode, proc.stdout + proc.stderr)
    assert outputs["good"][0] == 0 and redact_url(good) in outputs["good"][1], outputs["good"]
    assert outputs["missing"][0] == 2 and f"{redact_url(missing)}: HTTP 404" in outputs["missing"][1]
    assert outputs["flaky"][0] == 2 and f"{redact_url(flaky)}: giving up after 2 attempts" in outputs["flaky"][1]
    for _, text in outputs.values():
        assert [s for s in SECRETS if s in text] == [], text
    assert _grep(tmp_path, skip=set(tmp_path.glob("*/params.yaml"))) == []


def _grep(root: Path, skip: set[Path] = frozenset()) -> list[str]:
    """Every file under `root` (binary included) that holds one of the secrets, with the secret."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path not in skip:
            data = path.read_bytes()
            hits += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    return hits


@pytest.mark.timeout(900)
def test_no_secret_of_a_dataset_url_is_written_by_a_flow_run(digits_data, prefect_server, tmp_path):
    """The flow runs against the session's Prefect server, the secret URL given with `--set` (the
    README's advice) over one in params.yaml, and its PREFECT_HOME (the server's SQLite database, the
    flow runs' parameters, the flow's result storage) is searched whole, every other test's runs
    included."""
    archive = _digits_archive(digits_data.raw / "digits")
    root, home = tmp_path / "project", prefect_server.home
    with LoopbackHTTPServer({"/datasets/digits3.tar.gz": archive}) as server:
        secret_url = _with_secrets(server.url("/datasets/digits3.tar.gz"))
        _secret_params(
            root, _with_secrets(server.url("/datasets/other.tar.gz")), hashlib.sha256(archive).hexdigest(), **SMALL
        )
        env = {
            **prefect_server.env,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "flows/pipeline.py"),
                "--root",
                str(root),
                "--set",
                f"download.url={secret_url}",
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=800,
        )
        served = [path for path, _ in server.requests]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert served and set(served) == {"/datasets/digits3.tar.gz"}  # the real `--set` URL was used for the request
    assert [s for s in SECRETS if s in log] == [], "a secret in the logs"
    written = [
        root / "data/raw/archive/.complete",
        root / "artifacts/model/params.yaml",
        root / "artifacts/registered.json",
        root / "registry/models/resnet-digits/versions/1/params.yaml",
        root / "registry/models/resnet-digits/versions/1/manifest.json",
    ]
    assert all(p.is_file() for p in written), [p for p in written if not p.is_file()]
    assert redact_url(secret_url) in (root / "artifacts/model/params.yaml").read_text()
    assert _grep(root, skip={root / "params.yaml"}) == []
    assert _grep(home) == []  # Prefect's database (logs, artifacts, task runs, parameters) and result storage
    assert any(home.rglob("*.db")), "the server keeps its database in this PREFECT_HOME"
    runs = prefect_server.api("POST", "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 200})
    ours = next(r for r in runs if str(root) in json.dumps(r["parameters"]))
    assert "download.url" not in (ours["parameters"].get("overrides") or {})
    assert "Finished in state Completed()" in log, "the flow ran against this server"


def test_a_flow_refuses_secret_overrides_and_reads_secrets_from_the_environment_and_secret_blocks(prefect_server):
    """What a deployment or an API client passes as `overrides` is stored by Prefect before the flow
    starts: a secret there stops the run, naming the key; secrets come from the worker's environment
    or from a Secret block (stored encrypted by the server), read at run time."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.pipeline as pipeline

    secret_url = _with_secrets("http://data.example:8080/d.tar.gz")
    with pytest.raises(ValueError, match=r"overrides\['download.url'\] holds credentials") as err:
        pipeline.refuse_secret_overrides({"train.epochs": 2, "download.url": secret_url})
    assert [s for s in SECRETS if s in str(err.value)] == [] and "secret_blocks" in str(err.value)
    pipeline.refuse_secret_overrides({"train.epochs": 2, "download.url": "http://data.example/d.tar.gz"})

    env = {pipeline.SECRET_ENV: json.dumps({"download.url": secret_url})}
    assert pipeline.secret_overrides(environ=env) == {"download.url": secret_url}
    with pytest.raises(ValueError, match=pipeline.SECRET_ENV) as err:
        pipeline.secret_overrides(environ={pipeline.SECRET_ENV: f"download.url={secret_url}"})
    assert [s for s in SECRETS if s in str(err.value)] == []

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.base}):
        Secret(value=secret_url).save("test-dataset-url", overwrite=True)
        assert pipeline.secret_overrides({"download.url": "test-dataset-url"}, environ={}) == {
            "download.url": secret_url
        }
        with pytest.raises(
            ValueError, match=r"secret_blocks\['download.url'\]: cannot read the Secret block 'no-such'"
        ):
            pipeline.secret_overrides({"download.url": "no-such"}, environ={})
    assert _grep(prefect_server.home) == [], "Secret blocks are stored encrypted"
