"""Checks the driver makes before any Ray Train or Tune work starts, so that a mistyped path, a
missing bucket, wrong credentials or an impossible request fail in seconds with one line, instead of
after a minute of worker-group restarts and a wall of tracebacks.

`preflight(...)` is the one entry: every command calls it once with what it needs (data and its
splits, storage, the MLflow store, a registered model, the cluster and the requests it must hold),
and each check runs once, cheapest first. Demo shards are written there too (`ensure_data`), only
where the user asked for them or into the default demo folder.

Every failure here is an `InputError` (or `cluster.ClusterTooSmall`): `python -m orchestrator.run`
prints it as `error: ...` and exits with code 2. Errors a retry cannot fix are listed in
`DETERMINISTIC`; the training failure policy does not spend Ray Train's restarts on them
(`train.DeterministicFailurePolicy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .config import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig


class InputError(ConfigError):
    """Bad input found before any work: the message names the value and what to do."""


# Error class names that mean "the same input fails the same way again": never retried.
DETERMINISTIC = frozenset({
    "ConfigError", "InputError", "DataError", "ManifestMismatchError", "CheckpointIntegrityError", "UserPathError",
    "EvaluationError",
})


# ---------------------------------------------------------------------------------------------
# The entry.


@dataclass(frozen=True)
class Data:
    """Shards a command reads: their manifest must be readable and list `splits`."""

    url: str
    splits: tuple[str, ...]
    what: str = "data.url"  # how the user named it, for the message
    source: str | None = None  # a pipelines source to write demo shards from (see `ensure_data`)
    asked: bool = False  # the user asked for `source` at `url` (train --source)


@dataclass(frozen=True)
class Workers:
    """A request the cluster must be able to hold."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    what: str = "the job"  # named in the message

    @classmethod
    def of(cls, cfg: TrainConfig, what: str) -> Workers:
        sc = cfg.scaling
        return cls(sc.min_workers, sc.cpus_per_worker, sc.use_gpu, what)  # an elastic run starts with its minimum


@dataclass
class Checked:
    """What the checks found: resolved paths, and what they had to read anyway."""

    manifests: dict[str, dict] = field(default_factory=dict)  # absolute data URL -> its manifest
    storage: str | None = None  # absolute folder or s3:// URL
    tracking_uri: str | None = None
    model_meta: dict | None = None  # the registered model's metadata


def preflight(*, data: Sequence[Data] = (), storage: str | None = None, tracking: bool = False,
              model: str | None = None, workers: Sequence[Workers] = (), cluster: bool = False) -> Checked:
    """Every check a command needs before any work, each once: the data (demo shards written first where
    asked), the storage, the MLflow store, a registered model (loaded without running its code; its
    classes against the first data's), and, with `cluster` or `workers`, the Ray cluster: each distinct
    request fits, and the nodes have S3 credentials when the job uses S3. Raises on the first failure."""
    from .cluster import storage_url
    from .tracking import tracking_uri

    out = Checked()
    wanted: dict[str, tuple[str, list[str]]] = {}  # url -> (what, splits): one read per URL
    for d in data:
        url = ensure_data(d.url, d.source, asked=d.asked, what=d.what)
        what, splits = wanted.setdefault(url, (d.what, []))
        splits += [s for s in d.splits if s and s not in splits]
    for url, (what, splits) in wanted.items():
        out.manifests[url] = check_data(url, splits, what)
    if storage is not None:
        out.storage = storage_url(storage)
        check_storage(out.storage)
    if tracking or model:
        out.tracking_uri = tracking_uri()
        check_tracking(out.tracking_uri)
    if model:
        url, manifest = next(iter(out.manifests.items()))
        out.model_meta = check_model(model, out.tracking_uri, manifest, url)
    if cluster or workers:
        check_cluster(workers, [*out.manifests, out.storage or ""])
    return out


def for_training(cfg: TrainConfig, storage: str, *, checked: bool = False,
                 manifest: dict | None = None) -> tuple[str, dict]:
    """One training run's checks (`train.fit`): paths resolved where the user ran the command, the manifest
    with both splits, and unless a study or an ensemble already `checked` them once for all its trials:
    the storage, the MLflow store and the cluster. Returns (storage, manifest); `manifest`: the caller
    (`tuning.run_trials`) already read and checked it."""
    from .cluster import storage_url, user_path

    cfg.data.url = user_path(cfg.data.url, "data.url")
    if cfg.data.cache_dir:
        cfg.data.cache_dir = user_path(cfg.data.cache_dir, "data.cache_dir")
    data = [Data(cfg.data.url, (cfg.data.train_split, cfg.data.val_split))]
    if checked:
        return storage_url(storage), manifest or preflight(data=data).manifests[cfg.data.url]
    before = preflight(data=data, storage=storage, tracking=True, workers=[Workers.of(cfg, f"training {cfg.model.name}")])
    return before.storage, before.manifests[cfg.data.url]


def ensure_data(url: str, source: str | None, *, asked: bool = False, what: str = "data.url") -> str:
    """`url` resolved where the user ran the command; demo shards written from `source` when its folder
    has none yet, but only into the default demo folder (`data/<source>`), or wherever the user asked
    (`asked`: `train --source`). Never to an S3 URL and never into a folder that holds something else:
    a mistyped path is an error (`check_data`'s), not a place to write the demo data."""
    from pipelines.storage import is_s3

    from .cluster import user_path

    if is_s3(url):
        return url
    url = user_path(url, what)
    folder = Path(url)
    if not source or (folder.is_dir() and any(folder.iterdir())):
        return url
    if not (asked or folder == Path(user_path(f"data/{source.split(':')[0]}", what))):
        return url
    print(f"[data] writing {source} shards to {url}", flush=True)
    from pipelines.shards import main as shards_main

    shards_main(["write", "--source", source, "--out", url])
    return url


# ---------------------------------------------------------------------------------------------
# The checks.


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


def check_model(model_uri: str, tracking_uri: str, manifest: dict, data_url: str) -> dict:
    """The registered model is one this project can load without running its code (or is trusted), and
    was trained on the data's classes; returns its metadata."""
    from .batch_eval import check_classes, load_registered

    meta, _ = load_registered(model_uri, tracking_uri)
    check_classes(meta, manifest, data_url)
    return meta


def check_cluster(workers: Sequence[Workers], urls: list[str]) -> None:
    """Connect (or start a local cluster); the cluster can hold each distinct request (the first one that
    does not fit is named); the nodes can reach S3 when any of `urls` is on S3."""
    from .cluster import check_fits, check_worker_credentials, ensure_ray

    ensure_ray()
    seen = set()
    for w in workers:
        if (w.num_workers, w.cpus_per_worker, w.use_gpu) not in seen:
            seen.add((w.num_workers, w.cpus_per_worker, w.use_gpu))
            check_fits(w.num_workers, w.cpus_per_worker, w.use_gpu, w.what)
    check_worker_credentials(urls)


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
