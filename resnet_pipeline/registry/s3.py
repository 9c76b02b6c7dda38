"""The S3 backend of the registry storage: `s3://bucket/prefix` through boto3.

Credentials come from boto3's standard chain (environment, shared files, instance roles). The
endpoint, region and addressing style come from the arguments (params `register.s3_*`), else from
the environment (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`), so MinIO, SeaweedFS and other
S3-compatible stores work like AWS. Files go up and down with boto3's managed transfer (multipart,
parallel parts); small JSON objects with single requests, conditional ones with `IfNoneMatch="*"`
or `IfMatch=<etag>`: a 412 PreconditionFailed or 409 ConditionalRequestConflict is a `Conflict`.

Files come down in parallel ranged GETs of presigned URLs (signed by the same boto3 client, so the
same credentials, endpoint and addressing style), written in place and hashed in the same pass
(`transfer.download`): botocore's response stream costs a pull more CPU than the transfer itself
(`resnet-pipeline benchmark pull` measures both against a plain GET).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import ssl
import urllib.request
from pathlib import Path

from resnet_pipeline.httprange import BadResponse, HTTPStatus, open_range
from resnet_pipeline.redact import redact_text, redact_url
from resnet_pipeline.registry import transfer
from resnet_pipeline.registry.storage import Conflict, ObjectInfo, RegistryError, SizeMismatch

MB = 1024 * 1024
ADDRESSING_STYLES = ("auto", "path", "virtual")
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}


def parse_s3_url(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = location[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RegistryError(f"registry {location!r}: expected s3://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


def transfer_config():
    """Uploads: parts of 32 MB, 4 at a time, read in 1 MB pieces."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=32 * MB, multipart_chunksize=32 * MB, max_concurrency=4, io_chunksize=MB, use_threads=True
    )


class S3Storage:
    """Registry objects under `s3://bucket/prefix/`; see the module docstring."""

    def __init__(
        self,
        location: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        max_attempts: int = 5,
        access_key: str | None = None,
        secret_key: str | None = None,
        download_part_size: int = 64 * MB,
        download_concurrency: int = 4,
    ):
        import boto3
        from botocore.config import Config

        if addressing_style not in ADDRESSING_STYLES:
            raise RegistryError(
                f"register.s3_addressing_style: received {addressing_style!r}; allowed: {', '.join(ADDRESSING_STYLES)}"
            )
        self.location = location.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(location)
        self.transfer = transfer_config()
        self.max_attempts = max_attempts
        self.download_part_size, self.download_concurrency = download_part_size, download_concurrency
        config = Config(
            s3={"addressing_style": addressing_style},
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=self.transfer.max_request_concurrency + 4,
            connect_timeout=10,
            read_timeout=120,
            # the registry verifies every file's sha256 itself; no second CRC over each GET
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        self.client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)
        self.endpoint = redact_url(self.client.meta.endpoint_url)  # for messages: never with userinfo

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextlib.contextmanager
    def _errors(self, key: str, conflict_ok: bool = False):
        """Turn boto3's exceptions into a RegistryError that names the object, bucket or endpoint."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if conflict_ok and (code in CONFLICT_CODES or status in ("412", "409")):
                raise Conflict(key) from None
            raise self._client_error(key, code, status, err) from None
        except S3UploadFailedError as err:
            text = str(err)
            if "NoSuchBucket" in text:
                raise self._client_error(key, "NoSuchBucket", "404", err) from None
            if any(c in text for c in DENIED_CODES):
                raise self._client_error(key, "AccessDenied", "403", err) from None
            raise RegistryError(f"{self.url(key)}: upload failed: {redact_text(str(err))}") from None
        except NoCredentialsError:
            raise RegistryError(
                f"{self.url(key)}: no AWS credentials found (environment AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, ~/.aws, or an instance role)"
            ) from None
        except BotoCoreError as err:
            raise RegistryError(
                f"{self.url(key)}: cannot reach the S3 endpoint {self.endpoint}: {redact_text(str(err))}"
            ) from None

    def _client_error(self, key: str, code: str, status: str, err: Exception) -> RegistryError:
        if code == "NoSuchBucket":
            return RegistryError(f"s3://{self.bucket}: bucket does not exist at {self.endpoint}")
        if code in DENIED_CODES:
            return RegistryError(
                f"{self.url(key)}: access denied by {self.endpoint} ({code}); "
                "check the credentials and their permissions on the bucket"
            )
        if code in ("NoSuchKey", "404") or status == "404":
            return RegistryError(f"{self.url(key)}: object not found")
        return RegistryError(f"{self.url(key)}: {code or status}: {redact_text(str(err))}")

    def get(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                if max_bytes is not None and int(response.get("ContentLength") or 0) > max_bytes:
                    raise RegistryError(
                        f"{self.url(key)}: {response['ContentLength']} bytes, larger than "
                        f"{max_bytes}; refusing to read it"
                    )
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise RegistryError(f"{self.url(key)}: larger than {max_bytes} bytes; refusing to read it")
            return data, response["ETag"]

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
        return ObjectInfo(key, int(response["ContentLength"]), response["LastModified"], response.get("ETag"))

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._errors(key, conflict_ok=bool(extra)):
            response = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json", **extra
            )
        return response["ETag"]

    def upload_file(self, key: str, path: Path) -> str:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        info = self.head(key)
        if info is None:
            raise RegistryError(f"{self.url(key)}: not found right after its upload")
        return info.etag or ""

    def download_file(self, key: str, path: Path, size: int | None = None) -> str:
        """Download `key` to `path` (parallel ranged GETs); return the sha256 of the bytes written."""
        try:
            with self._errors(key):  # signing errors (no credentials) come from boto3
                digest, _ = transfer.download(
                    lambda start, end, etag: self._open_range(key, start, end, etag),
                    path,
                    part_size=self.download_part_size,
                    size=size,
                    concurrency=self.download_concurrency,
                    attempts=self.max_attempts,
                )
        except transfer.WrongSize as err:
            raise SizeMismatch(f"{self.url(key)}: {err}") from None
        except transfer.Retryable as err:
            raise RegistryError(
                f"{self.url(key)}: cannot download from the S3 endpoint {self.endpoint}: {redact_text(str(err))}"
            ) from None
        return digest

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.endpoint.startswith("https:"):
            return None
        bundle = os.environ.get("AWS_CA_BUNDLE")
        return ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()

    def _open_range(self, key: str, start: int, end: int | None, etag: str | None) -> transfer.Opened:
        """GET bytes start..end (inclusive) of `key` through a presigned URL."""
        url = self.presigned_url(key, expires=6 * 3600)
        try:
            try:
                opened = open_range(
                    urllib.request.Request(url), start, end, etag, timeout=120, context=self._ssl_context()
                )
            except HTTPStatus as err:
                if err.status != 416 or start != 0:
                    raise
                # an empty object has no byte 0: ask for all of it
                opened = open_range(urllib.request.Request(url), timeout=120, context=self._ssl_context())
        except HTTPStatus as err:
            found = re.search(r"<Code>([^<]+)</Code>", err.body)
            if err.status == 412:
                raise RegistryError(f"{self.url(key)}: the object changed during the download (ETag {etag})") from None
            raise self._client_error(key, found.group(1) if found else "", str(err.status), err) from None
        except BadResponse as err:
            raise RegistryError(f"{self.url(key)}: {err} from {self.endpoint}") from None
        if opened.total is None:
            opened.total = 0 if opened.start == 0 else None
        return opened

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"]))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: builtins.list[str]) -> None:  # `list` is the method above
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with self._errors(batch[0]):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True}
                )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise RegistryError(f"s3://{self.bucket}/{first['Key']}: delete failed: {first.get('Message')}")

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )
