"""The S3 server a benchmark runs against: any S3 at `--s3-endpoint URL` (credentials from the usual
AWS environment variables or profile), else the development SeaweedFS of a source checkout.

    server = s3_server(args.s3_endpoint, work / "seaweed")   # None: start the dev server
    bucket = server.make_bucket("bench-xyz")   # on an --s3-endpoint, stop() deletes it again

The development server (`infra/devs3.py`, a SeaweedFS `weed mini` on loopback with fixed test
credentials) is dev tooling, not part of the installed package: it is loaded from the checkout the
package runs from, and a command run from an installed wheel without `--s3-endpoint` stops with a
message saying what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import resnet_pipeline

log = logging.getLogger(__name__)

DEV_SERVER = Path(resnet_pipeline.__file__).resolve().parent.parent / "infra" / "devs3.py"


def endpoint_client(endpoint_url: str, access_key: str | None, secret_key: str | None, region: str, **config: Any):
    """A boto3 S3 client for `endpoint_url`, path-style; `config` goes to botocore's Config (it may
    override the addressing style). Used by the benchmarks and by infra/devs3.py."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {"s3": {"addressing_style": "path"}, **config}
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(**options),
    )


class S3ServerError(RuntimeError):
    """No S3 server to run a benchmark against."""


def check_available(endpoint_url: str | None) -> None:
    """Raise S3ServerError, saying what to do, if there is no endpoint and no dev server to start."""
    if not endpoint_url and not DEV_SERVER.is_file():
        raise S3ServerError(
            f"no --s3-endpoint given, and no development S3 server to start ({DEV_SERVER} is not there: "
            "this is not a source checkout); pass --s3-endpoint URL (credentials from the AWS environment "
            "variables or profile), or run infra/dev-s3.sh from a checkout and pass the endpoint it prints"
        )


def _devs3() -> ModuleType:
    """The checkout's `infra/devs3.py`, loaded once."""
    if "devs3" in sys.modules:
        return sys.modules["devs3"]
    check_available(None)
    spec = importlib.util.spec_from_file_location("devs3", DEV_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["devs3"] = module
    spec.loader.exec_module(module)
    return module


class Endpoint:
    """An S3 server that is already running somewhere: the interface of the dev server's `SeaweedS3`
    that the benchmarks use (endpoint_url, credentials, client(), make_bucket(), stop())."""

    process = None  # no local process to measure

    def __init__(self, endpoint_url: str) -> None:
        import boto3

        session = boto3.session.Session()
        credentials = session.get_credentials()
        if credentials is None:
            raise S3ServerError(
                f"--s3-endpoint {endpoint_url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        frozen = credentials.get_frozen_credentials()
        self.endpoint_url = endpoint_url
        self.access_key, self.secret_key = frozen.access_key, frozen.secret_key
        self.region = session.region_name or "us-east-1"
        self._buckets: list[str] = []

    def client(self, **config: Any):
        """A boto3 S3 client for the endpoint (path-style addressing; `config` goes to botocore's Config)."""
        return endpoint_client(self.endpoint_url, self.access_key, self.secret_key, self.region, **config)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name`; `stop()` deletes it again with everything in it."""
        self.client().create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def stop(self) -> None:
        """Delete the buckets this object created, objects first (a failure is logged, not raised)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        for bucket in self._buckets:
            try:
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if keys:
                        client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
                client.delete_bucket(Bucket=bucket)
            except (BotoCoreError, ClientError) as err:
                log.warning("benchmark: could not delete bucket %s on %s: %s", bucket, self.endpoint_url, err)
        self._buckets.clear()

    close = stop


def s3_server(endpoint_url: str | None, directory: Path):
    """A started S3 server: `endpoint_url`'s, else the dev SeaweedFS in `directory` (stop() it after)."""
    if endpoint_url:
        return Endpoint(endpoint_url)
    return _devs3().SeaweedS3(directory).start()
