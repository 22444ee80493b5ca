"""Local and S3 byte I/O for shards and manifests.

A URL is either a local path (``/data/digits``) or ``s3://bucket/prefix``. S3 goes through boto3,
so ``AWS_ENDPOINT_URL`` and the usual credential chain apply. Clients are created by the caller
(``make_s3_client``) and passed in; nothing here keeps a client in a module global.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

# Transient errors met while a response body is being read; the request-level retries of botocore
# do not cover these, so RetryingS3Reader re-opens the object at the current offset.
_STREAM_ERRORS = (ResponseStreamingError, ReadTimeoutError, ConnectionClosedError, ConnectionError, OSError)
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """An object or folder that cannot be read or written; the message names the URL."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in S3 URL")
    return bucket, key


def join(base: str, name: str) -> str:
    """Resolve ``name`` against a folder URL; absolute paths and s3:// URLs are returned as given."""
    if is_s3(name) or os.path.isabs(name):
        return name
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def make_s3_client(max_attempts: int = 8, max_pool_connections: int = 16) -> Any:
    """A boto3 S3 client with botocore's standard retry mode (throttling, 5xx, connection errors)."""
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", config=config)


def transfer_config(concurrency: int = 4) -> TransferConfig:
    """Multipart uploads above 16 MiB, ``concurrency`` parts at once."""
    return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=concurrency)


def _describe(url: str, err: Exception) -> StorageError:
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        meaning = {
            "NoSuchBucket": "bucket does not exist",
            "NoSuchKey": "object does not exist",
            "404": "object does not exist",
            "403": "access denied (check credentials)",
            "AccessDenied": "access denied (check credentials)",
            "InvalidAccessKeyId": "invalid credentials",
            "SignatureDoesNotMatch": "invalid credentials",
        }.get(code, code)
        return StorageError(f"{url}: {meaning} ({err})")
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{url}: cannot reach the S3 endpoint ({err})")
    return StorageError(f"{url}: {err}")


def _client(client: Any | None) -> Any:
    return client if client is not None else make_s3_client()


def read_bytes(url: str, client: Any | None = None) -> bytes:
    if not is_s3(url):
        try:
            with open(url, "rb") as f:
                return f.read()
        except OSError as err:
            raise StorageError(f"{url}: {err.strerror}") from err
    bucket, key = split_s3(url)
    try:
        return _client(client).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as err:
        raise _describe(url, err) from err


def bucket_exists_check(url: str, client: Any) -> None:
    """Raise a StorageError naming ``url`` if its bucket is missing or unreadable."""
    bucket, _ = split_s3(url)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{url}: bucket {bucket!r} does not exist") from err
        raise _describe(url, err) from err
    except BotoCoreError as err:
        raise _describe(url, err) from err


def size(url: str, client: Any | None = None) -> int | None:
    """Size in bytes, or None if the object/file does not exist (other errors raise)."""
    if not is_s3(url):
        return os.path.getsize(url) if os.path.isfile(url) else None
    bucket, key = split_s3(url)
    try:
        return _client(client).head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _describe(url, err) from err
    except BotoCoreError as err:
        raise _describe(url, err) from err


def stored_sha256(url: str, client: Any | None = None) -> str | None:
    """The sha256 of what is stored at ``url`` (None if absent).

    Local files are hashed; S3 objects carry it in their ``sha256`` metadata, set by ``publish_file``.
    """
    if not is_s3(url):
        return file_sha256(url) if os.path.isfile(url) else None
    bucket, key = split_s3(url)
    try:
        head = _client(client).head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _describe(url, err) from err
    return head.get("Metadata", {}).get("sha256")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_temp_path(url: str) -> str:
    """A temporary path for building a file that will land at ``url``.

    Local: beside the destination, so ``os.replace`` is atomic. S3: in the system temp folder.
    """
    if is_s3(url):
        fd, path = tempfile.mkstemp(suffix=".part")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="." + os.path.basename(url) + ".", suffix=".part", dir=os.path.dirname(os.path.abspath(url)))
    os.close(fd)
    return path


def publish_file(path: str, url: str, client: Any | None = None, *, sha256: str | None = None, concurrency: int = 4) -> None:
    """Move a finished local file to ``url`` atomically; the temp file is gone afterwards.

    Local: ``os.replace``. S3: a (multipart) upload, which S3 makes visible only when complete.
    """
    if not is_s3(url):
        os.chmod(path, 0o644)  # mkstemp makes 0600; a published shard is as readable as any file
        os.replace(path, url)
        return
    bucket, key = split_s3(url)
    extra = {"Metadata": {"sha256": sha256}} if sha256 else {}
    try:
        _client(client).upload_file(path, bucket, key, ExtraArgs=extra, Config=transfer_config(concurrency))
    except (ClientError, BotoCoreError) as err:
        raise _describe(url, err) from err
    except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
        raise StorageError(f"{url}: upload failed ({err})") from err
    finally:
        if os.path.exists(path):
            os.remove(path)


def write_bytes(url: str, data: bytes, client: Any | None = None) -> None:
    """Write a small object (the manifest) atomically."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            _client(client).put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as err:
            raise _describe(url, err) from err
        return
    path = local_temp_path(url)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    os.replace(path, url)


class RetryingS3Reader:
    """A read-only stream over an S3 object: ``get_object()["Body"]`` read in order, never downloaded
    first. A transient error mid-body re-opens the object with ``Range`` at the current offset."""

    def __init__(self, url: str, client: Any, attempts: int = 5):
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.client = client
        self.attempts = attempts
        self.pos = 0
        self.body = self._open()

    def _open(self) -> Any:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
        except (ClientError, BotoCoreError) as err:
            raise _describe(self.url, err) from err

    def read(self, n: int = -1) -> bytes:
        for attempt in range(self.attempts):
            try:
                data = self.body.read(n if n is not None and n >= 0 else None)
                self.pos += len(data)
                return data
            except _STREAM_ERRORS as err:
                if attempt == self.attempts - 1:
                    raise StorageError(f"{self.url}: read failed at byte {self.pos} after {self.attempts} attempts ({err})") from err
                self.body.close()
                self.body = self._open()
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> RetryingS3Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream(url: str, client: Any | None = None) -> IO[bytes] | RetryingS3Reader:
    """A binary stream over ``url`` (a local file, or an S3 object streamed with retries)."""
    if not is_s3(url):
        try:
            return open(url, "rb", buffering=_CHUNK)
        except OSError as err:
            raise StorageError(f"{url}: {err.strerror}") from err
    return RetryingS3Reader(url, _client(client))
