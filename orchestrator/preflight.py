"""Checks the driver makes before any Ray Train or Tune work starts, so that a mistyped path, a
missing bucket, wrong credentials or an impossible request fail in seconds with one line, instead of
after a minute of worker-group restarts and a wall of tracebacks.

Every failure here is an `InputError`: `python -m orchestrator.run` prints it as `error: ...` and
exits with code 2. Errors a retry cannot fix are listed in `DETERMINISTIC`; the training failure
policy does not spend Ray Train's restarts on them (`train.DeterministicFailurePolicy`).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlparse

from .config import ConfigError


class InputError(ConfigError):
    """Bad input found before any work: the message names the value and what to do."""


# Error class names that mean "the same input fails the same way again": never retried.
DETERMINISTIC = frozenset({
    "ConfigError", "InputError", "DataError", "ManifestMismatchError", "CheckpointIntegrityError", "UserPathError",
    "EvaluationError",
})


def check_data(url: str, splits: list[str], what: str = "data.url") -> dict:
    """The manifest at `url` (readable: the bucket exists and the credentials work), with `splits` in it."""
    import pipelines

    try:
        manifest = pipelines.read_manifest(url)
    except Exception as e:  # noqa: BLE001 - StorageError, botocore errors, OSError: all mean unreadable
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{what}={url}: cannot read its manifest.json ({reason}). Write shards there with "
            "`python -m pipelines.shards write --source ... --out URL`, or point "
            f"{what} at a folder or s3:// prefix that holds them"
        ) from None
    have = sorted(manifest.get("splits", {}))
    missing = [s for s in splits if s and s not in have]
    if missing:
        raise InputError(f"{what}={url}: no split {', '.join(map(repr, missing))} in its manifest (it has {', '.join(have)})")
    return manifest


def check_storage(url: str) -> None:
    """The storage location exists (a local folder is created) and is writable: a probe object is
    written and removed."""
    from pipelines import storage

    if urlparse(url).scheme == "s3":
        client = storage.make_s3_client()
        probe = f"{url.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        try:
            storage.bucket_exists_check(probe, client)
            storage.write_bytes(probe, b"", client)
            bucket, key = storage.split_s3(probe)
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"storage {url}: cannot write there ({reason}). Create the bucket, check the credentials "
                "and AWS_ENDPOINT_URL, or pass another --storage"
            ) from None
        return
    path = Path(url)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"storage {url}: cannot write there ({e.strerror or e}). Pass another --storage") from None


def check_tracking(uri: str) -> None:
    """A local MLflow store's folder exists; a tracking server answers (within seconds)."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise InputError(f"MLFLOW_TRACKING_URI={uri}: the folder {folder} does not exist")
    elif scheme in ("http", "https"):
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).read()
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) in (401, 403):
                return  # it answers; authentication is MLflow's business
            raise InputError(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({e}). Start it, or unset "
                "MLFLOW_TRACKING_URI to use ./mlflow.db"
            ) from None


def is_deterministic(err: BaseException | None) -> bool:
    """Whether `err` (or an error it wraps) is one a retry cannot fix."""
    seen = 0
    while err is not None and seen < 10:
        names = {c.__name__ for c in type(err).__mro__}
        if names & DETERMINISTIC:
            return True
        # Ray wraps a worker's exception: RayTaskError(cause=...), or a copy whose class derives from both.
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return False
