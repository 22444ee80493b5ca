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
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from .checkpoints import CHECKPOINT_FILE, CHECKSUM_FILE, checkpoint_url, load_checkpoint
from .config import TrainConfig, derived, flatten, run_name, to_dict
from .controller import FailFast, epoch_reports_to_tune
from .preflight import for_training

# Ray Train's controller imports this module (the trainer names the loop through it), and every Tune
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
        report_epochs: bool = False) -> FitResult:
    """Train `cfg` on the Ray cluster (starting a local one if needed); resume if this run exists.

    `checked`: the caller already ran the preflight checks (a study or ensemble checks once for all);
    `manifest`: the data's manifest, which the caller read and checked; `report_epochs`: the caller is a Tune
    trial whose scheduler (ASHA) needs every epoch's metrics (`tuning.run_trials` says so)."""
    import mlflow

    from . import tracking

    storage, manifest = for_training(cfg, storage, checked=checked, manifest=manifest)
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
             report_epochs: bool = False) -> FitResult:
    from . import tracking

    tracking.log_dict(client, run_id, to_dict(cfg), "config/train_config.json")
    for split, context in ((cfg.data.train_split, "training"), (cfg.data.val_split, "validation")):
        _log_dataset(client, run_id, manifest, cfg.data.url, split, context)
    print(f"[train] {label}: run {name}  (MLflow run {run_id} at {uri})", flush=True)
    result = _train(cfg, storage, name, label, {"train": to_dict(cfg), "mlflow_uri": uri, "mlflow_run_id": run_id,
                                                "name": name, "label": label}, report_epochs)

    local_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with result.checkpoint.as_directory() as ckpt_dir:
        for f in (CHECKPOINT_FILE, CHECKSUM_FILE):
            if (Path(ckpt_dir) / f).exists():
                shutil.copy(Path(ckpt_dir) / f, local_dir / f)
    state = load_checkpoint(local_dir / CHECKPOINT_FILE, f"{checkpoint_url(result.checkpoint)}/{CHECKPOINT_FILE}")
    final = state["history"][-1] if state["history"] else {}
    _log_final_model(client, run_id, cfg, state, local_dir / CHECKPOINT_FILE)
    sizes = state.get("progress", {}).get("world_sizes", [])
    if sizes:  # the world size per range of iterations (elastic runs change it)
        tracking.set_tags(client, run_id, {"world_size_by_iteration": ", ".join(f"from {s}: {w}" for s, w in sizes)})
    client.set_terminated(run_id, "FINISHED")
    prune_checkpoints(result, storage, name)
    print(
        f"[train] done: {label}  val top-1 err {final.get('val_top1_err', float('nan')):.2f}%  "
        f"checkpoint {result.checkpoint.path}",
        flush=True,
    )
    return FitResult(name, run_id, final, str(local_dir / CHECKPOINT_FILE), cfg)


def trainer(cfg: TrainConfig, storage: str, name: str, loop_config: dict,
            report_epochs: bool = False) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of one run, from Ray's public configuration only."""
    from .cluster import forwarded_env, storage_for_ray

    storage_path, fs = storage_for_ray(storage)
    sc = cfg.scaling
    # A node that is gone and a fixed world size: Ray Train retries the worker group's start every
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s); without a limit it would retry until the node came
    # back. Wait at most checkpoint.node_wait_s. (An elastic run goes on with the workers left.)
    start_timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    controller_retries = max(1, math.ceil(cfg.checkpoint.node_wait_s / start_timeout))
    callbacks = [FailFast()]
    if report_epochs:  # per-epoch metrics to the Tune trial (for schedulers such as ASHA)
        callbacks.append(epoch_reports_to_tune())
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tuple(sc.num_workers) if isinstance(sc.num_workers, list) else sc.num_workers,
            elastic_resize_monitor_interval_s=sc.resize_interval_s,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,  # deterministic: re-running the same command resumes from the last checkpoint
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures,
                                         controller_failure_limit=controller_retries,
                                         max_preemption_failures=cfg.checkpoint.max_preemptions),
            checkpoint_config=CheckpointConfig(  # the latest is always kept
                num_to_keep=cfg.checkpoint.keep_best,
                checkpoint_score_attribute="retention_score",  # see worker.checkpoint_report
                checkpoint_score_order="min",
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # our per-epoch line is the progress
            # Never a secret here: see cluster.FORWARDED_ENV. Ray's print patch off: our lines reach the
            # console once (with it, each went to stdout and through its logger to stderr).
            worker_runtime_env={"env_vars": {**forwarded_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=callbacks,
        ),
    )


def _train(cfg: TrainConfig, storage: str, name: str, label: str, loop_config: dict, report_epochs: bool = False):
    """`trainer(...).fit()`, again from the last committed checkpoint after a controller error that a
    retry can fix (an S3 error while Ray's controller deleted an old checkpoint or wrote its snapshot),
    at most checkpoint.max_failures times. Worker failures are retried by Ray itself; errors that a
    retry cannot fix (`controller.FailFast`) and lost nodes (checkpoint.node_wait_s) are not retried."""
    from .preflight import is_deterministic

    for attempt in range(cfg.checkpoint.max_failures + 1):
        try:
            return trainer(cfg, storage, name, loop_config, report_epochs).fit()
        except ray.train.TrainingFailedError as e:
            err = e
        cause = getattr(err, "controller_failure", None)
        retry = (isinstance(err, ray.train.ControllerError) and not is_deterministic(cause)
                 and type(cause).__name__ not in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"))
        if not retry or attempt == cfg.checkpoint.max_failures:
            raise err
        say(f"[{label}] the run's controller failed ({root_cause(err)}); resuming from the last checkpoint")
    raise AssertionError("unreachable")


def prune_checkpoints(result, storage: str, name: str) -> None:
    """After a run finished: delete the checkpoint folders Ray's retention left behind (a deletion that
    failed). A finished run is never resumed, so nothing here can break a resume; a failure is a warning."""
    import pyarrow.fs

    from .cluster import storage_for_ray

    keep = {str(result.checkpoint.path).rstrip("/")} | {str(c.path).rstrip("/") for c, _ in result.best_checkpoints or []}
    storage_path, fs = storage_for_ray(storage)
    fs = fs or pyarrow.fs.LocalFileSystem()
    run_dir = f"{storage_path.rstrip('/')}/{name}"
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(run_dir))
        stale = [i.path for i in found if i.type == pyarrow.fs.FileType.Directory
                 and i.base_name.startswith(("epoch_", "step_")) and i.path.rstrip("/") not in keep]
        for path in stale:
            fs.delete_dir(path)
    except Exception as e:  # noqa: BLE001 - housekeeping
        say(f"[checkpoint] warning: could not prune old checkpoints under {run_dir} ({str(e).splitlines()[0]}); they stay")


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
