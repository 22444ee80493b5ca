"""The driver of one training run: checks, the MLflow run, the TorchTrainer, the final model.

`fit(cfg)` trains one config on the Ray cluster (the worker loop is `orchestrator.worker`), resuming
when the run exists; Tune wraps `fit` (`orchestrator.tuning`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy  # Ray 2.60 (pinned)
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.config import LoggingConfig

from .checkpoints import CHECKPOINT_FILE, CHECKSUM_FILE, checkpoint_url, load_checkpoint
from .config import TrainConfig, derived, flatten, run_name, to_dict

# Ray Train's controller imports this module (it unpickles the failure policy below), and every Tune
# trial's driver does: MLflow, the model zoo and the worker loop (torchvision, the pipelines) are
# imported where they are used, not here (train_fn.py says what that saves).
from .train_fn import say, train_loop_per_worker

# ---------------------------------------------------------------------------------------------
# The driver: builds the trainer, records the run, logs the final model.


@dataclass
class FitResult:
    name: str
    run_id: str
    metrics: dict
    checkpoint_path: str  # a local copy of the final checkpoint file
    config: TrainConfig


def ensure_data(cfg: TrainConfig, source: str | None, *, asked: bool = False) -> None:
    """Write the demo shards when a config names a source and its folder has none yet: only into the
    default demo folder (`data/<source>` where the user runs the command), or wherever the user asked
    with `train --source` (`asked`). Never to an S3 URL and never into a folder that holds something
    else: a mistyped path is an error (the preflight's), not a place to write the demo data."""
    from pipelines.storage import is_s3

    from .cluster import user_path

    if not source or is_s3(cfg.data.url):
        return
    cfg.data.url = user_path(cfg.data.url, "data.url")
    folder = Path(cfg.data.url)
    default = Path(user_path(f"data/{source.split(':')[0]}", "data.url"))
    if (folder.is_dir() and any(folder.iterdir())) or not (asked or folder == default):
        return
    print(f"[data] writing {source} shards to {cfg.data.url}", flush=True)
    from pipelines.shards import main as shards_main

    shards_main(["write", "--source", source, "--out", cfg.data.url])


def preflight(cfg: TrainConfig, storage: str, checked: bool = False, manifest: dict | None = None) -> tuple[str, dict]:
    """Everything the driver can check before Ray Train starts (seconds, one line per failure):
    paths resolved where the user ran the command, the manifest readable with both splits, the
    storage writable, the MLflow store reachable. Returns (storage, manifest); `checked`: the caller
    (a study or an ensemble) already probed the storage and the MLflow store, once for all its trials;
    `manifest`: the caller also read and checked the data's manifest (tuning.run_trials)."""
    from . import preflight as checks
    from . import tracking
    from .cluster import storage_url, user_path

    cfg.data.url = user_path(cfg.data.url, "data.url")
    if cfg.data.cache_dir:
        cfg.data.cache_dir = user_path(cfg.data.cache_dir, "data.cache_dir")
    storage = storage_url(storage)
    if manifest is None:
        manifest = checks.check_data(cfg.data.url, [cfg.data.train_split, cfg.data.val_split])
    if not checked:
        checks.check_storage(storage)
        checks.check_tracking(tracking.tracking_uri())
    return storage, manifest


def check_cluster(cfgs: list[TrainConfig], what: str) -> None:
    """The cluster can hold each request, and its nodes can reach S3 when the job uses it."""
    from .cluster import check_fits, check_worker_credentials, ensure_ray

    ensure_ray()
    for c in cfgs:
        check_fits(c.scaling.num_workers, c.scaling.cpus_per_worker, c.scaling.use_gpu, what)
    check_worker_credentials([c.data.url for c in cfgs])


class _Trainer(ray.train.torch.TorchTrainer):
    """TorchTrainer whose failure policy does not retry what a retry cannot fix."""

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = DeterministicFailurePolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**kwargs)


class DeterministicFailurePolicy(DefaultFailurePolicy):
    """Ray's default policy (restart the worker group up to `max_failures` times), except for errors
    a retry cannot fix (bad data, a corrupt checkpoint, a config error): those fail the run at once,
    instead of costing a minute of restarts that fail the same way."""

    def make_decision(self, training_failed_error):
        from .preflight import is_deterministic

        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if failures and any(is_deterministic(e) for e in failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def _tolerant_delete(fs, fs_path: str) -> None:
    """Deleting an old checkpoint is housekeeping: a failure (a transient 500 from S3 on
    ListObjectsV2, measured) must not fail a run whose training finished. It is a warning, and the
    checkpoint stays in storage."""
    try:
        _ray_delete_fs_path(fs=fs, fs_path=fs_path)
    except Exception as e:  # noqa: BLE001
        say(f"[checkpoint] warning: could not delete the old checkpoint {fs_path} ({str(e).splitlines()[0]}); it stays")


# Ray Train's checkpoint manager runs in its controller, which imports this module to unpickle the
# failure policy above: that is where its deletions go through `_tolerant_delete` (Ray 2.60, pinned).
from ray.train.v2._internal.execution.checkpoint import checkpoint_manager as _ray_ckpt_manager  # noqa: E402

_ray_delete_fs_path = getattr(_ray_ckpt_manager.delete_fs_path, "__wrapped__", _ray_ckpt_manager.delete_fs_path)
_tolerant_delete.__wrapped__ = _ray_delete_fs_path  # a re-import wraps Ray's function, not this one
_ray_ckpt_manager.delete_fs_path = _tolerant_delete


def root_cause(err: BaseException) -> str:
    """The first line of what went wrong in a worker, without Ray's wrapping."""
    failures = getattr(err, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) if failures else None
    for e in (inner, getattr(inner, "cause", None), getattr(err, "controller_failure", None)):
        if e is not None and not isinstance(e, ray.exceptions.RayError):
            text = [line for line in str(e).strip().splitlines() if line.strip()]
            if "Original Traceback" in str(e):  # torch's DataLoader re-raises a worker's error with its traceback
                return text[-1].strip()
            return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    text = [line for line in str(inner or err).strip().splitlines() if line.strip()]
    return text[-1] if text else type(err).__name__


class TrainingFailed(RuntimeError):
    """Training failed on the cluster after its retries; the message is the root cause, one line."""


def fit(cfg: TrainConfig, storage: str = "./runs", *, parent_run_id: str | None = None, experiment: str | None = None,
        label: str | None = None, checked: bool = False, manifest: dict | None = None,
        report_epochs: bool = True) -> FitResult:
    """Train `cfg` on the Ray cluster (starting a local one if needed); resume if this run exists.

    `checked`: the caller already ran the preflight checks (a study or ensemble checks once for all);
    `manifest`: the data's manifest, which the caller read and checked; `report_epochs`: inside a Tune
    trial, report every epoch's metrics to Tune (what a scheduler such as ASHA needs)."""
    import mlflow

    from . import tracking

    storage, manifest = preflight(cfg, storage, checked, manifest)
    if not checked:
        check_cluster([cfg], f"training {cfg.model.name}")
    name = run_name(cfg)
    label = label or name
    uri = tracking.tracking_uri()
    client = mlflow.tracking.MlflowClient(uri)
    params = {**flatten(to_dict(cfg)), **{f"derived.{k}": v for k, v in derived(cfg).items()}}
    run_id, finished = tracking.find_or_create_run(
        client, experiment or cfg.tracking.experiment, name, params,
        {"model": cfg.model.name, "mlflow.runName": label}, parent_run_id,
    )
    if finished:  # an earlier invocation completed this run: nothing to train again
        return finished_result(client, run_id, name, cfg)
    try:
        return _fit_run(cfg, storage, manifest, client, uri, run_id, name, label, report_epochs)
    except BaseException as e:  # any failure once the run exists: FAILED, with the error, never left RUNNING
        tracking.mark_failed(client, run_id, root_cause(e) if isinstance(e, ray.train.TrainingFailedError) else e)
        if isinstance(e, ray.train.TrainingFailedError):
            raise TrainingFailed(f"{label}: {root_cause(e)}") from None
        raise


def _fit_run(cfg: TrainConfig, storage: str, manifest: dict, client, uri: str, run_id: str, name: str, label: str,
             report_epochs: bool = True) -> FitResult:
    from . import tracking
    from .cluster import forwarded_env, storage_for_ray

    tracking.log_dict(client, run_id, to_dict(cfg), "config/train_config.json")
    for split, context in ((cfg.data.train_split, "training"), (cfg.data.val_split, "validation")):
        _log_dataset(client, run_id, manifest, cfg.data.url, split, context)
    print(f"[train] {label}: run {name}  (MLflow run {run_id} at {uri})", flush=True)
    callbacks = []
    if report_epochs and _in_tune_session():  # per-epoch metrics to Tune (for schedulers such as ASHA)
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())

    storage_path, fs = storage_for_ray(storage)
    # A node that is gone: Ray Train retries the worker group's start every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    # (60 s); without a limit it would retry until the node came back. Wait at most checkpoint.node_wait_s.
    start_timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    controller_retries = max(1, math.ceil(cfg.checkpoint.node_wait_s / start_timeout))
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "mlflow_uri": uri, "mlflow_run_id": run_id, "name": name,
                           "label": label},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,  # deterministic: re-running the same command resumes from the last checkpoint
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures,
                                         controller_failure_limit=controller_retries),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep_best,
                checkpoint_score_attribute="val_top1_err",
                checkpoint_score_order="min",
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # our per-epoch line is the progress
            worker_runtime_env={"env_vars": forwarded_env()},  # never a secret: see cluster.FORWARDED_ENV
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error

    local_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with result.checkpoint.as_directory() as ckpt_dir:
        for f in (CHECKPOINT_FILE, CHECKSUM_FILE):
            if (Path(ckpt_dir) / f).exists():
                shutil.copy(Path(ckpt_dir) / f, local_dir / f)
    state = load_checkpoint(local_dir / CHECKPOINT_FILE, f"{checkpoint_url(result.checkpoint)}/{CHECKPOINT_FILE}")
    final = state["history"][-1] if state["history"] else {}
    _log_final_model(client, run_id, cfg, state, local_dir / CHECKPOINT_FILE)
    client.set_terminated(run_id, "FINISHED")
    print(
        f"[train] done: {label}  val top-1 err {final.get('val_top1_err', float('nan')):.2f}%  "
        f"checkpoint {result.checkpoint.path}",
        flush=True,
    )
    return FitResult(name, run_id, final, str(local_dir / CHECKPOINT_FILE), cfg)


def _log_dataset(client, run_id: str, manifest: dict, url: str, split: str, context: str, attempts: int = 3) -> None:
    """`tracking.log_dataset`, tried again on an MLflow error: MLflow's SQL store looks the dataset up, then
    inserts it, so two trials that log the same data at the same moment collide on its unique key (seen
    from a fresh clone: a member failed with `UNIQUE constraint failed: datasets.experiment_id, ...`); the
    next try finds the other trial's row and links it."""
    import time

    import mlflow

    from . import tracking

    for attempt in range(1, attempts + 1):
        try:
            tracking.log_dataset(client, run_id, manifest, url, split, context)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


def _in_tune_session() -> bool:
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session as in_tune

    return in_tune()


def download_checkpoint(client, run_id: str) -> tuple[str, dict]:
    """(local path, state) of the final checkpoint a finished run logged to MLflow."""
    import mlflow

    dst = tempfile.mkdtemp()
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=f"checkpoint/{CHECKPOINT_FILE}", dst_path=dst, tracking_uri=client.tracking_uri,
    )
    try:  # runs logged before checksums existed have no sidecar
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoint/{CHECKSUM_FILE}", dst_path=dst, tracking_uri=client.tracking_uri,
        )
    except Exception:  # noqa: BLE001, S110
        pass
    return path, load_checkpoint(Path(path), f"MLflow run {run_id} artifact checkpoint/{CHECKPOINT_FILE}")


def finished_result(client, run_id: str, name: str, cfg: TrainConfig) -> FitResult:
    """The result of a run that already finished, from its MLflow record (no Ray Train start)."""
    path, state = download_checkpoint(client, run_id)
    final = state["history"][-1] if state["history"] else {}
    print(f"[train] {name} already finished (MLflow run {run_id}): val top-1 err {final.get('val_top1_err', float('nan')):.2f}%", flush=True)
    return FitResult(name, run_id, final, path, cfg)


def _log_final_model(client, run_id: str, cfg: TrainConfig, state: dict, checkpoint_file: Path) -> None:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    import models

    from . import tracking

    client.log_artifact(run_id, str(checkpoint_file), "checkpoint")
    if checkpoint_file.with_name(CHECKSUM_FILE).exists():
        client.log_artifact(run_id, str(checkpoint_file.with_name(CHECKSUM_FILE)), "checkpoint")
    client.log_image(run_id, _png_to_image(tracking.error_plot_png(client, run_id, cfg.model.name)), "error_curves.png")
    if not cfg.tracking.log_model:
        return
    model = models.create_model(cfg.model.name, num_classes=len(state["classes"]), **cfg.model.overrides)
    model.load_state_dict(state["model"])
    model.eval()
    size = cfg.data.test_size or cfg.data.size
    example = torch.zeros(1, model.conv1.in_channels, size, size)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    with mlflow.start_run(run_id=run_id), tracking.quiet("mlflow.pytorch"):
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            # pickle keeps the net fully convolutional (pt2 would fix the input size); our code ships along.
            serialization_format="pickle",
            code_paths=[str(tracking.PROJECT_ROOT / "models")],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


def _png_to_image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))
