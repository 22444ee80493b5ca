"""Connecting to Ray (a running cluster, or a local one started on demand) and checking what it can hold."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import ray


class ClusterTooSmall(RuntimeError):
    """The job asks for more than the cluster has: it would wait forever."""


def ensure_ray() -> None:
    """Inside `ray job submit` (RAY_ADDRESS set) join that cluster; otherwise start a local one.

    A cluster started by `ray start --head` has token authentication on; the token lives in
    ~/.ray/auth_token and clients must say RAY_AUTH_MODE=token, which we set for the user.
    """
    if ray.is_initialized():
        return
    token = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_ADDRESS") and token.exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # A private local cluster for this process; the dashboard is not needed for it.
        ray.init(include_dashboard=False, log_to_driver=True)


def check_fits(num_workers: int, cpus_per_worker: float, use_gpu: bool, what: str = "the job") -> None:
    """Fail fast when the request can never be scheduled on this cluster (no autoscaling assumed
    unless RESNET_ALLOW_AUTOSCALE=1, for clusters that grow on demand)."""
    if os.environ.get("RESNET_ALLOW_AUTOSCALE") == "1":
        return
    have = ray.cluster_resources()
    need = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(num_workers)
    short = {k: v for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
    if short:
        needs = ", ".join(f"{v:g} {k}" for k, v in need.items())
        haves = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in need)
        raise ClusterTooSmall(
            f"{what} needs {needs} ({num_workers} workers) but the cluster has {haves}. "
            "Lower scaling.num_workers / scaling.cpus_per_worker, set scaling.use_gpu=false, or use a "
            "bigger cluster (RESNET_ALLOW_AUTOSCALE=1 if it scales up on demand)."
        )


def storage_url(url: str) -> str:
    """`url` with a local folder made absolute (Ray workers and Tune trials run in other directories)."""
    if urlparse(url).scheme in ("", "file"):
        return storage_for_ray(url)[0]
    return url


def storage_for_ray(url: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig: local folders become absolute paths;
    s3:// URLs get an explicit S3 filesystem that honours AWS_ENDPOINT_URL (MinIO, moto, ...)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        import pyarrow.fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        fs = pyarrow.fs.S3FileSystem(**kwargs)
        return f"{parsed.netloc}{parsed.path}".rstrip("/"), fs
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"storage URL {url!r}: use a local folder or s3://bucket/prefix")
    return str(Path(parsed.path if parsed.scheme else url).expanduser().resolve()), None
