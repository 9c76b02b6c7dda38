"""One object of an S3 folder download as a plain signed GET (see data/s3folder.py): botocore's
SigV4 signer applied per request, one keep-alive `http.client` connection per thread, retries of
transient failures, the listing's size and the stored checksum checked, and a hand-over to
botocore's `get_object` for what a plain GET does not handle. Errors name `s3://bucket/key`, never
a signed URL or header."""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import random
import re
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from resnet_pipeline.data.fetch import DownloadError
from resnet_pipeline.redact import redact_text

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_BACKOFF = 8.0  # seconds: the longest wait between two attempts of one object
URL_EXPIRES = 3600  # seconds a presigned URL is valid; each attempt signs a fresh one
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_CHECKSUM_MODE = {"x-amz-checksum-mode": "ENABLED"}  # as get_object asks: the stored checksum comes back


class _Checksum:
    """The object's stored checksum from the response (`x-amz-checksum-crc32|sha256|sha1`), checked
    over the body as botocore's get_object does; composite (multipart) ones and algorithms botocore
    needs awscrt for (crc32c, crc64nvme) are not checked, as botocore without awscrt does not."""

    def __init__(self, headers: Any) -> None:
        self.name, self.want, self._state = "", "", None
        if (headers.get("x-amz-checksum-type") or "").upper() == "COMPOSITE":
            return
        for name in ("crc32", "sha256", "sha1"):
            value = headers.get(f"x-amz-checksum-{name}")
            if value and "-" not in value:
                self.name, self.want = name, value
                self._state = 0 if name == "crc32" else hashlib.new(name)
                return

    def update(self, block: bytes) -> None:
        if isinstance(self._state, int):
            self._state = zlib.crc32(block, self._state)
        elif self._state is not None:
            self._state.update(block)

    def problem(self) -> str | None:
        """What does not match, or None (also when there is nothing to check)."""
        if self._state is None:
            return None
        digest = self._state.to_bytes(4, "big") if isinstance(self._state, int) else self._state.digest()
        got = base64.b64encode(digest).decode()
        return None if got == self.want else f"{self.name} checksum {got} received, the object's is {self.want}"


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    target: Path


class _Transient(Exception):
    """Worth another attempt: a connection error, a cut body, a 5xx or a throttling answer."""


class AskBotocore(Exception):
    """An answer the plain GET does not handle (a redirect, 403, 404): ask through get_object."""


class Signer:
    """Signed GETs of the objects of one bucket: botocore's SigV4 signer (`S3SigV4Auth`) applied to
    each request, at the URL and signing scope of botocore's own presigned URL of one key (its
    endpoint, addressing style and region rules); a presigned URL per object where that URL is not
    of the expected form or there are no credentials to sign with."""

    def __init__(self, client: Any, credentials: Any, bucket: str, sample_key: str) -> None:
        from botocore.utils import percent_encode

        self.client, self.bucket, self._encode = client, bucket, percent_encode
        self.base: str | None = None
        parts = urlsplit(self.presigned(sample_key))
        query = parse_qs(parts.query)
        scope = query.get("X-Amz-Credential", [""])[0].split("/")
        encoded = percent_encode(sample_key, safe="/~")
        if (
            credentials is not None
            and query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]
            and len(scope) == 5
            and parts.path.endswith(encoded)
        ):
            self.base = f"{parts.scheme}://{parts.netloc}{parts.path[: len(parts.path) - len(encoded)]}"
            self._credentials, self._region, self._service = credentials, scope[2], scope[3]

    def presigned(self, key: str) -> str:
        """A presigned GET URL of `key` (a secret: never logged)."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=URL_EXPIRES
        )

    def request(self, key: str) -> tuple[str, dict[str, str]]:
        """URL and headers of a signed GET of `key` (secrets both: never logged)."""
        if self.base is None:
            return self.presigned(key), {}
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=self.base + self._encode(key, safe="/~"), headers=_CHECKSUM_MODE)
        S3SigV4Auth(self._credentials.get_frozen_credentials(), self._service, self._region).add_auth(request)
        return request.url, dict(request.headers.items())


class Fetcher:
    """Fetches objects of one bucket with signed plain GETs, one keep-alive connection per thread."""

    def __init__(self, client: Any, signer: Signer, ca_bundle: str | None, retries: int, backoff: float) -> None:
        self.client = client
        self.signer = signer
        self.bucket = signer.bucket
        self.retries = retries
        self.backoff = backoff
        self.timeout = client.meta.config.read_timeout
        self._ca_bundle = ca_bundle
        self._ssl: ssl.SSLContext | None = None
        self._local = threading.local()
        self._open: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def fetch(self, obj: S3Object, part: Path) -> None:
        """`obj` into `obj.target`, through `part` (a temporary name), retried while transient."""
        for attempt in range(self.retries + 1):
            try:
                try:
                    self._get(obj, part)
                except AskBotocore:
                    self._get_object(obj, part)
                os.replace(part, obj.target)
                return
            except _Transient as e:
                if attempt == self.retries:
                    raise DownloadError(
                        f"s3://{self.bucket}/{obj.key}: giving up after {attempt + 1} attempts: {e}"
                    ) from None
                delay = min(self.backoff * 2**attempt, MAX_BACKOFF) * random.uniform(0.5, 1.0)
                log.warning(
                    "s3://%s/%s: %s; retry %d/%d in %.2fs", self.bucket, obj.key, e, attempt + 1, self.retries, delay
                )
                time.sleep(delay)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                with self._lock:
                    self._ssl = self._ssl or ssl.create_default_context(cafile=self._ca_bundle)
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
            conns[(scheme, netloc)] = conn
            with self._lock:
                self._open.append(conn)
        return conn

    def fetch_with_botocore(self, obj: S3Object, part: Path) -> None:
        """`obj` into `obj.target` through get_object only (botocore retries)."""
        self._get_object(obj, part)
        os.replace(part, obj.target)

    def _get(self, obj: S3Object, part: Path) -> None:
        url, headers = self.signer.request(obj.key)
        parts = urlsplit(url)
        conn = self._connection(parts.scheme, parts.netloc)
        try:
            conn.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                head = resp.read(4096)
                code = _ERROR_CODE.search(head)
                why = f"HTTP {resp.status}" + (f" {code.group(1).decode(errors='replace')}" if code else "")
                resp.read()  # leave the connection reusable
                raise (_Transient if resp.status in _TRANSIENT_STATUS else AskBotocore)(why)
            announced = resp.getheader("Content-Length")
            if announced is not None and int(announced) != obj.size:
                conn.close()
                raise DownloadError(self._size_error(obj, int(announced)))
            checksum = _Checksum(resp.headers)
            received = self._write(lambda: resp.read(CHUNK), part, checksum)
            if announced is not None and received < int(announced):  # read(n) ends quietly at a cut
                conn.close()
                raise _Transient(f"body cut after {received} of {announced} bytes")
            if bad := checksum.problem():
                raise _Transient(bad)
        except ssl.SSLCertVerificationError as e:
            conn.close()
            why = f"TLS certificate not trusted: {e.verify_message}"
            raise DownloadError(f"s3://{self.bucket}/{obj.key}: {why}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            conn.close()  # a fresh connection for the next attempt
            raise _Transient(f"{type(e).__name__}: {redact_text(str(e)) or 'connection lost'}") from None
        if received != obj.size:
            raise DownloadError(self._size_error(obj, received))

    def _get_object(self, obj: S3Object, part: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=obj.key)["Body"]
            chunks = body.iter_chunks(CHUNK)
            received = self._write(lambda: next(chunks, b""), part)
        except (ClientError, BotoCoreError) as e:
            raise DownloadError(f"s3://{self.bucket}/{obj.key}: {redact_text(str(e))}") from None
        if received != obj.size:
            raise DownloadError(self._size_error(obj, received))

    @staticmethod
    def _write(read: Any, part: Path, checksum: _Checksum | None = None) -> int:
        """Blocks from `read()` into `part`; errors of `read` propagate, local ones are final."""
        received = 0
        try:
            f = open(part, "wb")
        except OSError as e:
            raise DownloadError(f"{part}: cannot write: {e}") from None
        with f:
            while block := read():
                try:
                    f.write(block)
                except OSError as e:
                    raise DownloadError(f"{part}: cannot write: {e}") from None
                received += len(block)
                if checksum is not None:
                    checksum.update(block)
        return received

    def _size_error(self, obj: S3Object, received: int) -> str:
        return (
            f"s3://{self.bucket}/{obj.key}: {received} bytes received, the listing says {obj.size} "
            "(changed since it was listed?)"
        )


def plain_get_refused(client: Any, url: str) -> str | None:
    """Why the objects must go through get_object (a proxy, a client certificate), or None."""
    from botocore.utils import get_environ_proxies

    cfg = client.meta.config
    scheme = urlsplit(url).scheme
    if (cfg.proxies or {}).get(scheme) or get_environ_proxies(url).get(scheme):
        return "a proxy is configured"
    if cfg.client_cert:
        return "a client certificate is configured"
    return None
