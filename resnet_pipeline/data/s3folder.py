"""An `s3://bucket/prefix` image folder into a local folder, many requests at a time.

boto3 lists the folder (pagination, credentials, endpoint and addressing rules) and every key is
checked before the first object is fetched: none may leave the prefix (`..`, absolute), no two may
land on the same file, no class folder may be empty (checked by the download stage). The objects
then come down in `workers` threads, each with one keep-alive `http.client` connection, as plain
GETs signed by botocore's SigV4 signer at the URL and scope of botocore's own presigned URL of one
key (else as one presigned URL per object): botocore's full request pipeline costs ~0.86 ms of CPU
per object, and with small objects on a small machine the CPU is the limit.

The plain GET (data/s3get.py) keeps what botocore would do: TLS verified against the CA bundle botocore uses
(`AWS_CA_BUNDLE`, `ca_bundle` in the AWS config, else its default), its timeouts, retries of
transient failures (connection errors, cut bodies, 5xx, 503 SlowDown, 429) with bounded, jittered
backoff. Where botocore would go through a proxy or present a client certificate, every object goes
through `get_object` instead; an answer the plain GET does not handle (a redirect to another
region, a 403 or 404) is asked again through `get_object`, so that botocore's redirect handling
and error messages apply. Each object's length must match the listing's `Size`; each file is
written under a temporary name and renamed into place. Logs and errors name `s3://bucket/key`,
never a signed URL.
"""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from resnet_pipeline.data.s3get import Fetcher, S3Object, Signer, plain_get_refused

log = logging.getLogger(__name__)


def s3_keys(client: Any, bucket: str, prefix: str, url: str) -> tuple[dict[str, int], dict[str, int]]:
    """The objects under the prefix as {key: size} (checked: none may escape it) and the file count
    per class folder."""
    objects: dict[str, int] = {}
    classes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            relative = Path(key[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"download.path: object key {key!r} under {url} escapes the folder")
            if not relative.parts:
                continue
            is_marker = key.endswith("/")
            if is_marker or len(relative.parts) > 1:
                classes.setdefault(relative.parts[0], 0)
            if not is_marker:
                objects[key] = int(obj["Size"])
                if len(relative.parts) > 1:
                    classes[relative.parts[0]] += 1
    return objects, classes


def plan(objects: dict[str, int], prefix: str, dest: Path, url: str) -> list[S3Object]:
    """Where every object goes below `dest`; two keys naming one file (`a//b`, `a/./b`) are refused."""
    planned: dict[Path, str] = {}
    out = []
    for key, size in objects.items():
        target = dest / key[len(prefix) :]
        if target in planned:
            raise ValueError(
                f"download.path: object keys {planned[target]!r} and {key!r} under {url} name the same file"
            )
        planned[target] = key
        out.append(S3Object(key, size, target))
    return out


def _run(work: Iterator[S3Object], fetch: Any, workers: int, parts: Path, total: int) -> None:
    """`fetch(obj, part)` for every object of `work` in `workers` threads; the first error stops all."""
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    bar = tqdm(total=total, desc="download s3", unit="file", disable=None)

    def loop(n: int) -> None:
        part = parts / str(n)
        while not stop.is_set():
            with lock:
                obj = next(work, None)
            if obj is None:
                return
            try:
                fetch(obj, part)
            except Exception as e:
                errors.append(e)
                stop.set()
                return
            bar.update()

    threads = [threading.Thread(target=loop, args=(n,), name=f"s3-fetch-{n}") for n in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        bar.close()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class S3Folder:
    """A listed `s3://bucket/prefix/`: its objects {key: size}, files per class folder, the client."""

    url: str
    bucket: str
    prefix: str
    objects: dict[str, int]
    classes: dict[str, int]
    client: Any
    ca_bundle: str | None
    credentials: Any = None  # the client's (botocore Credentials); None: presigned URLs only


@functools.cache
def _data_loader() -> Any:
    """botocore's loader of its JSON service models, shared by the sessions of one process (it only
    reads botocore's data files; credentials stay per session)."""
    import botocore.session

    return botocore.session.get_session().get_component("data_loader")


def list_folder(url: str, endpoint_url: str | None, workers: int = 16) -> S3Folder:
    """List s3://bucket/prefix/ (every key checked) with a client good for `workers` threads."""
    import botocore.session
    from botocore.config import Config as BotoConfig
    from botocore.httpsession import get_cert_path

    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise ValueError(f"download.path: received {url!r}; expected s3://bucket/prefix")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    session = botocore.session.get_session()
    session.register_component("data_loader", _data_loader())
    client = session.create_client(
        "s3",
        endpoint_url=endpoint_url or None,
        config=BotoConfig(max_pool_connections=max(10, workers), signature_version="s3v4"),
    )
    objects, classes = s3_keys(client, bucket, prefix, url)
    ca_bundle = session.get_config_variable("ca_bundle") or get_cert_path(True)  # as botocore resolves it
    return S3Folder(url, bucket, prefix, objects, classes, client, ca_bundle, session.get_credentials())


def fetch_folder(folder: S3Folder, dest: Path, workers: int = 16, *, retries: int = 5, backoff: float = 0.5) -> int:
    """Every object of `folder` into dest (keeping the key below the prefix), `workers` requests at
    a time; return the file count. Every target is planned (and checked) before the first request."""
    todo = plan(folder.objects, folder.prefix, dest, folder.url)
    for parent in sorted({o.target.parent for o in todo}):
        parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        return 0
    signer = Signer(folder.client, folder.credentials, folder.bucket, todo[0].key)
    fetcher = Fetcher(folder.client, signer, folder.ca_bundle, retries, backoff)
    fetch = fetcher.fetch
    log.debug("download: %s signed %s", folder.url, "per request" if signer.base else "as presigned URLs")
    if refused := plain_get_refused(folder.client, signer.presigned(todo[0].key)):
        log.info("download: %s; fetching %s through get_object", refused, folder.url)
        fetch = fetcher.fetch_with_botocore
    parts = dest / f".s3-parts-{secrets.token_hex(4)}"
    parts.mkdir()
    try:
        _run(iter(todo), fetch, min(workers, len(todo)), parts, len(todo))
    finally:
        fetcher.close()
        shutil.rmtree(parts, ignore_errors=True)
    return len(todo)
