"""Local and S3 storage: byte I/O for shards and manifests (boto3), and the pyarrow filesystem Ray
Train and Tune write checkpoints and results through. The one place for S3 settings.

A URL is either a local path (``/data/digits``) or ``s3://bucket/prefix``. S3 goes through boto3,
so ``AWS_ENDPOINT_URL`` and the usual credential chain apply. Clients are created by the caller
(``make_s3_client``) and passed in; nothing here keeps a client in a module global. boto3 and
botocore are imported on first use of an S3 URL: a node that reads local shards needs neither.

S3-compatible stores (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` not on amazonaws.com): recent
boto3 and pyarrow upload with aws-chunked encoding and a CRC trailer, which some stores save inside
the object. ``make_s3_client`` then computes checksums only when an operation requires them and
uses path-style addresses; ``s3_compat_env()`` gives the environment that makes other processes
(Ray workers, jobs, pyarrow) do the same.

Outages, one budget for every S3 call: ``PIPELINES_S3_RETRY_SECONDS`` (default 60; its older
spelling ``ORCHESTRATOR_S3_ATTEMPTS``, a number of pyarrow attempts, is still read, converted and
warned about). boto3 calls here are retried with capped exponential backoff until the budget is
spent, on connection errors, timeouts, 5xx and throttling, on top of botocore's own few quick
attempts; a shard being streamed resumes where it stopped with a ranged GET (``RetryingS3Reader``).
Ray's pyarrow filesystem (``arrow_filesystem``) gets as many attempts of the AWS SDK's standard
strategy as take that long on average (``arrow_attempts``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
_CHUNK = 1 << 20
T = TypeVar("T")


# The AWS SDK's standard retry strategy (aws-sdk-cpp, which pyarrow uses): before retry i a random delay
# in [0, min(25 ms x 2^i, 20 s)], so on average half of that.
_ARROW_BASE_S, _ARROW_CAP_S = 0.025, 20.0


def _arrow_seconds(attempts: int) -> float:
    """The average time `attempts` attempts of the standard strategy spend waiting."""
    return sum(0.5 * min(_ARROW_BASE_S * 2**i, _ARROW_CAP_S) for i in range(max(0, attempts - 1)))


def _retry_seconds() -> float:
    if "PIPELINES_S3_RETRY_SECONDS" in os.environ or "ORCHESTRATOR_S3_ATTEMPTS" not in os.environ:
        return float(os.environ.get("PIPELINES_S3_RETRY_SECONDS", "60"))
    warnings.warn("ORCHESTRATOR_S3_ATTEMPTS is replaced by PIPELINES_S3_RETRY_SECONDS, one budget (in seconds) for "
                  "every S3 call; it is converted for now", FutureWarning, stacklevel=2)
    return _arrow_seconds(int(os.environ["ORCHESTRATOR_S3_ATTEMPTS"]))


RETRY_SECONDS = _retry_seconds()


def _botocore() -> Any:
    """botocore's exceptions module, imported on first use (only S3 URLs need boto3)."""
    from botocore import exceptions

    return exceptions


def _request_errors() -> tuple[type[BaseException], ...]:
    e = _botocore()
    return (e.ClientError, e.BotoCoreError)


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Transient errors met while a response body is being read; the request-level retries of botocore
    do not cover these, so RetryingS3Reader re-opens the object at the current offset."""
    e = _botocore()
    return (e.ResponseStreamingError, e.IncompleteReadError, e.ReadTimeoutError, e.ConnectionClosedError,
            ConnectionError, OSError)


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


def s3_endpoint() -> str | None:
    """The S3 endpoint boto3 will use from the environment (``AWS_ENDPOINT_URL_S3`` wins), or None."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def is_aws_endpoint(endpoint: str | None) -> bool:
    """True for AWS itself: no endpoint override, or a host under amazonaws.com(.cn)."""
    if not endpoint:
        return True
    host = (urlparse(endpoint if "://" in endpoint else f"https://{endpoint}").hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn")) or host in ("amazonaws.com", "amazonaws.com.cn")


def s3_compat_env(endpoint: str | None = None) -> dict[str, str]:
    """Environment settings (no secrets) that make boto3 and pyarrow in another process talk to the
    configured S3 endpoint as ``make_s3_client`` does: empty for AWS itself, else checksums only when
    an operation requires them (no aws-chunked uploads with a CRC trailer, which some S3-compatible
    stores keep inside the object: issue 12)."""
    endpoint = endpoint if endpoint is not None else s3_endpoint()
    if is_aws_endpoint(endpoint):
        return {}
    return {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def make_s3_client(max_attempts: int = 4, max_pool_connections: int = 16, *, connect_timeout: float = 5, read_timeout: float = 60) -> Any:
    """A boto3 S3 client: botocore's standard retry mode (throttling, 5xx, connection errors) for
    quick blips (longer outages are retried by the functions here, see the module docstring); for a
    non-AWS ``AWS_ENDPOINT_URL`` also checksums only when required and path-style addressing."""
    import boto3
    from botocore.config import Config

    extra: dict[str, Any] = {}
    if not is_aws_endpoint(s3_endpoint()):
        extra = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": "path"},
        }
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        **extra,
    )
    return boto3.client("s3", config=config)


def is_transient(err: BaseException) -> bool:
    """An S3 error worth retrying: the server unreachable or overloaded, not a wrong name or key."""
    e = _botocore()
    if isinstance(err, e.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500 or code.isdigit() and int(code) >= 500
    # A whole request failed once botocore's own attempts are spent (a server that is down).
    return isinstance(err, (e.EndpointConnectionError, e.ConnectTimeoutError, e.ReadTimeoutError, e.ConnectionClosedError,
                            e.ResponseStreamingError))


def with_retries(call: Callable[[], T], url: str, *, seconds: float | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried on transient S3 errors with backoff 0.5, 1, 2, 4, 5, 5 ... s until
    ``seconds`` (default ``RETRY_SECONDS``) have passed; then the last error propagates."""
    budget = RETRY_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except _request_errors() as err:
            delay = min(0.5 * 2**attempt, 5.0)
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
            if attempt == 0:
                warnings.warn(f"{url}: S3 unavailable ({str(err).splitlines()[0][:160]}); retrying for up to {budget:.0f} s", RuntimeWarning, stacklevel=2)
            sleep(delay)
            attempt += 1


def transfer_config(concurrency: int = 4) -> Any:
    """Multipart uploads above 16 MiB, ``concurrency`` parts at once."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=concurrency)


def _describe(url: str, err: Exception) -> StorageError:
    e = _botocore()
    if isinstance(err, e.ClientError):
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
    if isinstance(err, e.NoCredentialsError):
        return StorageError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(err, e.EndpointConnectionError):
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
    c = _client(client)
    try:
        return with_retries(lambda: c.get_object(Bucket=bucket, Key=key)["Body"].read(), url)
    except _request_errors() as err:
        raise _describe(url, err) from err


def bucket_exists_check(url: str, client: Any) -> None:
    """Raise a StorageError naming ``url`` if its bucket is missing or unreadable."""
    bucket, _ = split_s3(url)
    try:
        with_retries(lambda: client.head_bucket(Bucket=bucket), url)
    except _botocore().ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{url}: bucket {bucket!r} does not exist") from err
        raise _describe(url, err) from err
    except _botocore().BotoCoreError as err:
        raise _describe(url, err) from err


def _head(url: str, client: Any | None) -> dict | None:
    """The S3 object's HEAD response, or None if it does not exist (other errors raise)."""
    bucket, key = split_s3(url)
    c = _client(client)
    try:
        return with_retries(lambda: c.head_object(Bucket=bucket, Key=key), url)
    except _botocore().ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _describe(url, err) from err
    except _botocore().BotoCoreError as err:
        raise _describe(url, err) from err


def size(url: str, client: Any | None = None) -> int | None:
    """Size in bytes, or None if the object/file does not exist (other errors raise)."""
    if not is_s3(url):
        return os.path.getsize(url) if os.path.isfile(url) else None
    head = _head(url, client)
    return None if head is None else head["ContentLength"]


def stored_sha256(url: str, client: Any | None = None) -> str | None:
    """The sha256 of what is stored at ``url`` (None if absent).

    Local files are hashed; S3 objects carry it in their ``sha256`` metadata, set by ``publish_file``.
    """
    if not is_s3(url):
        return file_sha256(url) if os.path.isfile(url) else None
    head = _head(url, client)
    return None if head is None else head.get("Metadata", {}).get("sha256")


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
    c = _client(client)
    try:
        with_retries(lambda: _upload(c, path, bucket, key, extra, concurrency), url)
    except _request_errors() as err:
        raise _describe(url, err) from err
    except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
        raise StorageError(f"{url}: upload failed ({err})") from err
    finally:
        if os.path.exists(path):
            os.remove(path)


def _upload(client: Any, path: str, bucket: str, key: str, extra: dict, concurrency: int) -> None:
    from boto3.exceptions import S3UploadFailedError

    try:
        client.upload_file(path, bucket, key, ExtraArgs=extra, Config=transfer_config(concurrency))
    except S3UploadFailedError as err:  # s3transfer wraps the botocore error; unwrap it so it can be retried
        cause = err.__context__ or err.__cause__
        if isinstance(cause, _request_errors()):
            raise cause from err
        raise


def write_bytes(url: str, data: bytes, client: Any | None = None) -> None:
    """Write a small object (the manifest) atomically."""
    if is_s3(url):
        bucket, key = split_s3(url)
        c = _client(client)
        try:
            with_retries(lambda: c.put_object(Bucket=bucket, Key=key, Body=data), url)
        except _request_errors() as err:
            raise _describe(url, err) from err
        return
    path = local_temp_path(url)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    os.replace(path, url)


class RetryingS3Reader:
    """A read-only stream over an S3 object: ``get_object()["Body"]`` read in order, never downloaded
    first. A transient error mid-body re-opens the object with ``Range: bytes=N-`` at the offset
    reached, retrying (with ``with_retries``' backoff) for up to ``seconds``; an object that changed
    meanwhile (another ETag) is an error rather than a splice of two versions.

    ``size`` is the object's length (from the first response); ``resumes`` counts the ranged re-opens.
    """

    def __init__(self, url: str, client: Any, seconds: float | None = None):
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.client = client
        self.seconds = RETRY_SECONDS if seconds is None else seconds
        self.pos = 0
        self.resumes = 0
        self.etag: str | None = None
        self.size: int | None = None
        self.body = self._open()

    def _open(self) -> Any:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.etag and self.pos:
            extra["IfMatch"] = self.etag
        try:
            response = with_retries(lambda: self.client.get_object(Bucket=self.bucket, Key=self.key, **extra), self.url, seconds=self.seconds)
        except _request_errors() as err:
            if isinstance(err, _botocore().ClientError) and err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.url}: object changed while it was being read (at byte {self.pos})") from err
            raise _describe(self.url, err) from err
        if self.etag is None:
            self.etag = response.get("ETag")
            self.size = response.get("ContentLength")
        return response["Body"]

    def read(self, n: int = -1) -> bytes:
        deadline = time.monotonic() + self.seconds
        while True:
            try:
                data = self.body.read(n if n is not None and n >= 0 else None)
                self.pos += len(data)
                return data
            except _stream_errors() as err:
                if time.monotonic() > deadline:
                    raise StorageError(f"{self.url}: read failed at byte {self.pos} for {self.seconds:.0f} s ({err})") from err
                self.body.close()
                self.resumes += 1
                self.body = self._open()  # Range: bytes=pos-; retries while the server is unreachable

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

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


# ---------------------------------------------------------------------------------------------
# pyarrow's S3 filesystem, for Ray: Ray Train and Tune write checkpoints and results through it.

def arrow_attempts(seconds: float | None = None) -> int:
    """How many attempts of the standard strategy wait `seconds` (default: the S3 budget) on average:
    16 for 60 s, which rides out an endpoint that is gone for 30 s (the SDK's default 3 gave up within a
    second, and cost a worker-group restart or failed a finished run)."""
    budget = RETRY_SECONDS if seconds is None else seconds
    attempts = 1
    while _arrow_seconds(attempts) < budget:
        attempts += 1
    return attempts


def arrow_filesystem(url: str, attempts: int | None = None) -> tuple[str, Any]:
    """(path, pyarrow S3 filesystem) for ``s3://bucket/prefix``, for Ray's ``storage_path`` and
    ``storage_filesystem``: the endpoint and region boto3 would use, and retries for the S3 budget."""
    bucket, key = split_s3(url)
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        ep = urlparse(endpoint)
        kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return f"{bucket}/{key}".rstrip("/"), _retrying_s3(kwargs, attempts or arrow_attempts())


def _retrying_s3(kwargs: dict, attempts: int) -> Any:
    """pyarrow's S3FileSystem whose retries survive the trip to Ray's controller and workers: pyarrow
    pickles every option but the retry strategy, so the copies Ray unpickled fell back to 3 attempts
    (measured: a 30 s outage failed the checkpoint-manager snapshot upload). This one pickles as a call
    that builds it again, retries included."""
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        def __reduce__(self):
            return (_retrying_s3, (kwargs, attempts))

    return RetryingS3FileSystem(**kwargs, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts))
