"""Connecting to Ray (a running cluster, or a local one started on demand) and checking what it can hold."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import ray


class ClusterTooSmall(RuntimeError):
    """The job asks for more than the cluster has: it would wait forever."""


class UserPathError(ValueError):
    """A relative path that would land in a temporary folder; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------------
# Paths the user typed. `ray job submit --working-dir .` runs the job inside Ray's package cache
# (/tmp/ray/session_*/runtime_resources/working_dir_files/_ray_pkg_*), which Ray deletes: a relative
# path there ("runs", "data/digits", MLflow's "./mlflow.db") would put results where they are lost.
# The submitting side passes the folder the user ran the command in as ORCHESTRATOR_CWD.

CWD_ENV = "ORCHESTRATOR_CWD"


def in_ray_package_cache(path: str | None = None) -> bool:
    return "runtime_resources" in Path(path or os.getcwd()).resolve().parts


def user_cwd() -> Path:
    """The folder relative paths are resolved against: where the user ran the command."""
    if os.environ.get(CWD_ENV):
        return Path(os.environ[CWD_ENV])
    return Path.cwd()


def user_path(path: str, what: str = "path") -> str:
    """`path` made absolute against the user's folder (URLs such as s3://... are returned as they are)."""
    parsed = urlparse(path)
    if parsed.scheme not in ("", "file"):
        return path
    local = Path(parsed.path if parsed.scheme else path).expanduser()
    if local.is_absolute():
        return str(local)
    if not os.environ.get(CWD_ENV) and in_ray_package_cache():
        raise UserPathError(
            f"{what} {path!r} is relative, and this job runs in Ray's package cache ({os.getcwd()}), which Ray "
            "deletes: pass an absolute path or an s3:// URL, or submit with `python -m orchestrator.submit`, "
            f"which passes your folder as {CWD_ENV}"
        )
    return str((user_cwd() / local).resolve())


# ---------------------------------------------------------------------------------------------
# What travels to the workers. Secrets never do: Ray writes runtime-env variables in plain text to
# its logs and shows them in its state API. Workers get credentials the way the platform provides
# them (the node's environment, an instance profile or IRSA, an AWS profile or credentials file).

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_S3_ADDRESSING_STYLE", "MLFLOW_TRACKING_URI",
    "ORCHESTRATOR_GIT_COMMIT", "ORCHESTRATOR_USER", CWD_ENV, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "PIPELINES_S3_RETRY_SECONDS",  # the one S3 retry budget (pipelines/storage.py)
)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")


def forwarded_env() -> dict:
    """Non-secret settings the workers need to reach the same S3 endpoint and MLflow store as the driver."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    try:  # an S3-compatible endpoint that is not AWS: the same checksum and addressing settings everywhere
        from pipelines.storage import s3_compat_env

        env.update({k: v for k, v in s3_compat_env().items() if k not in env})
    except ImportError:
        pass
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if "@" in urlparse(uri).netloc:  # user:password@host: a secret inside a setting
        env.pop("MLFLOW_TRACKING_URI")
    return env


def _credentials_source() -> str | None:
    import boto3

    creds = boto3.Session().get_credentials()
    return getattr(creds, "method", "unknown") if creds else None


@ray.remote(num_cpus=0)
def _worker_credentials_source() -> str | None:
    return _credentials_source()


def check_worker_credentials(urls: list[str]) -> None:
    """When the job reads or writes S3 and the driver has AWS credentials, every node must have some
    too (they are never forwarded): fail before any work, saying how to give them to the cluster."""
    if not any(urlparse(u).scheme == "s3" for u in urls if u):
        return
    mine = _credentials_source()
    if mine is None:
        return  # the driver has none either: the manifest check already said so, or the bucket is public
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {
        n["NodeManagerAddress"] + ":" + n["NodeID"][:8]: _worker_credentials_source.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            runtime_env={"env_vars": forwarded_env()},
        ).remote()
        for n in nodes
    }
    lacking = [node for node, ref in refs.items() if ray.get(ref, timeout=60) is None]
    if lacking:
        raise ClusterTooSmall(
            f"the Ray nodes {', '.join(lacking)} have no AWS credentials, but this job uses S3 (the driver has "
            f"credentials from {mine!r}). Credentials are never sent with a job: start the nodes with "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in their environment, give them an instance profile or "
            "IRSA (infra/), or an AWS profile or credentials file on every node (AWS_SHARED_CREDENTIALS_FILE)"
        )


def ensure_ray() -> None:
    """Inside `ray job submit` (RAY_ADDRESS set) join that cluster; otherwise start a local one.

    A cluster started by `ray start --head` has token authentication on; the token lives in
    ~/.ray/auth_token and clients must say RAY_AUTH_MODE=token, which we set for the user.
    """
    if ray.is_initialized():
        return
    token = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_ADDRESS") and token.exists() and not os.environ.get("RAY_AUTH_MODE"):
        from .ray_compat import enable_token_auth

        enable_token_auth()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # A private local cluster for this process (stopped when it exits): loopback only, free ports,
        # token auth, the dashboard on (Ray Train asks the state API about its controller, and warns
        # at every poll when it is missing). See local_cluster.py.
        from .local_cluster import connect

        connect()
    from .ray_compat import check_version, drop_known_noise

    check_version()
    drop_known_noise()


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
    return user_path(url, "storage")


def storage_for_ray(url: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig: local folders become absolute paths;
    s3:// URLs get pipelines.storage's S3 filesystem (endpoint, region, retries: the one S3 stack)."""
    from pipelines.storage import arrow_filesystem, is_s3

    if is_s3(url):
        return arrow_filesystem(url)
    if urlparse(url).scheme not in ("", "file"):
        raise ValueError(f"storage URL {url!r}: use a local folder or s3://bucket/prefix")
    return user_path(url, "storage"), None
