"""The S3 backend of the registry storage: `s3://bucket/prefix` through boto3.

Credentials come from boto3's standard chain (environment, shared files, instance roles). The
endpoint, region and addressing style come from the arguments (params `register.s3_*`), else from
the environment (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`), so MinIO, SeaweedFS and other
S3-compatible stores work like AWS. Files go up and down with boto3's managed transfer (multipart,
parallel parts); small JSON objects with single requests, conditional ones with `IfNoneMatch="*"`
or `IfMatch=<etag>`: a 412 PreconditionFailed or 409 ConditionalRequestConflict is a `Conflict`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from resnet_pipeline.registry.storage import Conflict, ObjectInfo, RegistryError

MB = 1024 * 1024
ADDRESSING_STYLES = ("auto", "path", "virtual")
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
                "ExpiredToken"}


def parse_s3_url(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = location[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RegistryError(f"registry {location!r}: expected s3://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


def transfer_config():
    """Parts of 32 MB, 4 at a time, written in 1 MB pieces (tuned with `benchmark pull`)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=32 * MB, multipart_chunksize=32 * MB, max_concurrency=4,
                          io_chunksize=MB, use_threads=True)


class S3Storage:
    """Registry objects under `s3://bucket/prefix/`; see the module docstring."""

    def __init__(self, location: str, *, endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str = "auto", max_attempts: int = 5,
                 access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        if addressing_style not in ADDRESSING_STYLES:
            raise RegistryError(f"register.s3_addressing_style: received {addressing_style!r}; "
                                f"allowed: {', '.join(ADDRESSING_STYLES)}")
        self.location = location.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(location)
        self.transfer = transfer_config()
        config = Config(s3={"addressing_style": addressing_style},
                        retries={"mode": "standard", "max_attempts": max_attempts},
                        max_pool_connections=self.transfer.max_request_concurrency + 4,
                        connect_timeout=10, read_timeout=120,
                        # the registry verifies every file's sha256 itself; no second CRC over each GET
                        response_checksum_validation="when_required")
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        self.client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                                     config=config)
        self.endpoint = self.client.meta.endpoint_url

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
            raise RegistryError(f"{self.url(key)}: upload failed: {err}") from None
        except NoCredentialsError:
            raise RegistryError(f"{self.url(key)}: no AWS credentials found (environment AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY, ~/.aws, or an instance role)") from None
        except BotoCoreError as err:
            raise RegistryError(f"{self.url(key)}: cannot reach the S3 endpoint {self.endpoint}: {err}") from None

    def _client_error(self, key: str, code: str, status: str, err: Exception) -> RegistryError:
        if code == "NoSuchBucket":
            return RegistryError(f"s3://{self.bucket}: bucket does not exist at {self.endpoint}")
        if code in DENIED_CODES:
            return RegistryError(f"{self.url(key)}: access denied by {self.endpoint} ({code}); "
                                 "check the credentials and their permissions on the bucket")
        if code in ("NoSuchKey", "404") or status == "404":
            return RegistryError(f"{self.url(key)}: object not found")
        return RegistryError(f"{self.url(key)}: {code or status}: {err}")

    def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._errors(key, conflict_ok=bool(extra)):
            response = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                              ContentType="application/json", **extra)
        return response["ETag"]

    def upload_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def download_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"]))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            with self._errors(batch[0]):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise RegistryError(f"s3://{self.bucket}/{first['Key']}: delete failed: {first.get('Message')}")

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                  ExpiresIn=expires)
