"""The training recipe: any registered ResNet, DDP on Ray Train (V2), checkpoints, resume, MLflow.

Reads top to bottom: the worker's loop (model, data, optimisation, evaluation, reporting), then the
driver that builds the TorchTrainer. The worker knows nothing of Tune; Tune wraps `fit`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy  # Ray 2.60 (pinned)
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.config import LoggingConfig

import models
import pipelines

from . import tracking
from .checkpoints import (
    CHECKPOINT_FILE,
    CHECKSUM_FILE,
    checkpoint_url,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, derived, flatten, from_dict, run_name, to_dict
from .step import (
    Transformed,
    all_reduce_sum,
    evaluate,
    lr_at,
    make_batch_transforms,
    make_optimizer,
    make_transforms,
)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------
# The loop each Ray Train worker runs.


def say(line: str) -> None:
    """One line to the console, once. Ray Train V2 patches `print` in workers to write to stdout and
    to its logger (stderr) too, so a printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO under a logger named by file path, out of LoggingConfig's
    reach; our one line per epoch is the progress. Its print patch also puts the root logger at INFO
    on the console, where botocore said "Found endpoint for s3 via: environment_global" per request."""
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    _quiet_ray_train_reports()
    cfg = from_dict(TrainConfig, loop_config["train"])
    d = derived(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    manifest = pipelines.read_manifest(cfg.data.url)
    classes = manifest["classes"]
    model = models.create_model(cfg.model.name, num_classes=len(classes), **cfg.model.overrides)
    if cfg.scaling.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_gpu and cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, d["lr_scaled"], device)

    # Resume: everything needed to continue exactly where the last checkpoint left off.
    start_epoch, step, history = 0, 0, []
    plateau = {"scale": 1.0, "best": float("inf"), "bad": 0}
    warm = cfg.schedule.warmup_lr > 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as ckpt_dir:
            state = load_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, f"{checkpoint_url(ckpt)}/{CHECKPOINT_FILE}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        plateau, warm = state["plateau"], state["warm"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if rank == 0:
            say(f"[{loop_config.get('label') or cfg.model.name}] resume from epoch {start_epoch + 1} (iteration {step})")

    # (1) Wrap in DDP and move to this worker's device: gloo on CPU, NCCL on GPU.
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    if cfg.scaling.compile:  # after DDP wrapping, so DDP's bucketed all-reduce still overlaps the backward
        model = torch.compile(model)
    # Decoding on the GPU: loader processes only read shards; the encoded bytes go to nvJPEG and the
    # crops run as tensor ops on the device (a seeded generator per epoch keeps resume exact).
    gpu_decode = cfg.data.decode_on == "gpu"
    aug_rng = torch.Generator()
    if gpu_decode:
        train_btf, test_btf = make_batch_transforms(cfg, manifest, device, aug_rng)
        train_tf = test_tf = None  # the loaders yield encoded bytes
    else:
        train_tf, test_tf = make_transforms(cfg, manifest)
    loader_args = dict(
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.seed, cache_dir=cfg.data.cache_dir or None,
        pin_memory=on_gpu, decode=not gpu_decode,  # page-locked batches: the copies below do not block
    )
    val_loader = pipelines.make_loader(
        cfg.data.url, cfg.data.val_split, d["per_worker_batch"], transform=test_tf, shuffle=False, **loader_args
    )
    if gpu_decode:
        val_loader = Transformed(val_loader, test_btf)
    # MLflow's HTTP retries wait 2, 4, 8, 16, 32 s...; waits of 1, 2, 4, 8, 16 s find a server that is
    # back sooner after a short outage (10 attempts still cover about 15 minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    logger = tracking.EpochLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and cfg.scaling.bf16)

    label = loop_config.get("label") or loop_config.get("name", cfg.model.name)
    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.schedule.epochs):
        epoch_start = time.perf_counter()
        # (2) Every rank gets the same number of batches per epoch (the loader guarantees it), so
        # DDP's gradient all-reduce never waits on a rank that ran out of data.
        loader = pipelines.make_loader(
            cfg.data.url, cfg.data.train_split, d["per_worker_batch"], epoch=epoch, transform=train_tf,
            shuffle=True, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error, **loader_args,
        )
        if gpu_decode:
            aug_rng.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + rank)
            loader = Transformed(loader, train_btf)
        steps_per_epoch = len(loader)
        if cfg.debug.kill_worker_at_epoch == epoch and rank == world - 1 and world > 1:
            marker = Path(cfg.debug.kill_marker)
            if cfg.debug.kill_marker and not marker.exists():
                marker.write_text(f"killed rank {rank} at epoch {epoch}\n")
                say(f"[fault drill] killing worker rank {rank} at epoch {epoch}")
                os._exit(1)

        model.train()
        # Sums stay on the device: no host sync per step, so the CPU queues the next step while the GPU runs.
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        t0 = time.perf_counter()
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if on_gpu and cfg.scaling.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, d["lr_scaled"], step, steps_per_epoch, plateau["scale"])
            if warm:
                lr = cfg.schedule.warmup_lr
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            batch_correct = (logits.detach().argmax(1) == labels).sum()
            loss_sum += loss.detach() * len(labels)
            correct += batch_correct
            seen += len(labels)
            if warm:  # v1: ResNet-110 warms up until the training error drops below 80 % (all ranks agree)
                c, n = all_reduce_sum([float(batch_correct), float(len(labels))], device)
                done_iters = cfg.schedule.warmup_iters and step >= cfg.schedule.warmup_iters
                below = cfg.schedule.warmup_until_train_err and 100 * (1 - c / n) < cfg.schedule.warmup_until_train_err
                if done_iters or below:
                    warm = False
            if cfg.schedule.max_iters and step >= cfg.schedule.max_iters:
                break  # v1 CIFAR: stop at 64k iterations, not at a whole number of epochs
        loss_sum, correct = float(loss_sum), float(correct)  # waits for the device: the epoch's work is done
        elapsed = time.perf_counter() - t0
        loss_sum, correct, seen, worker_rate_sum = all_reduce_sum(
            [loss_sum, correct, seen, seen / max(elapsed, 1e-9)], device
        )
        skipped = all_reduce_sum([float(getattr(loader, "loader", loader).skipped)], device)[0]  # data.on_error=skip
        val = evaluate(bare, val_loader, device)
        if cfg.schedule.kind == "plateau":  # /10 when val error has not improved for `patience` epochs
            if val["top1_err"] < plateau["best"] - 1e-6:
                plateau["best"], plateau["bad"] = val["top1_err"], 0
            else:
                plateau["bad"] += 1
                if plateau["bad"] >= cfg.schedule.plateau_patience:
                    plateau["scale"] *= cfg.schedule.gamma
                    plateau["bad"] = 0
        metrics = {
            "train_loss": loss_sum / max(seen, 1),
            "train_top1_err": 100 * (1 - correct / max(seen, 1)),
            "val_loss": val["loss"],
            "val_top1_err": val["top1_err"],
            "val_top5_err": val["top5_err"],
            "lr": lr,
            "images_per_sec": seen / max(elapsed, 1e-9),
            "images_per_sec_per_worker": worker_rate_sum / world,
            "skipped_samples": skipped,
        }
        history.append({"epoch": epoch, "step": step, **metrics})

        # (3) ray.train.report is a barrier: every rank calls it once per epoch.
        last = epoch == cfg.schedule.epochs - 1 or bool(cfg.schedule.max_iters and step >= cfg.schedule.max_iters)
        report = {**metrics, "epoch": epoch, "step": step}
        if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or last:
            rngs = [None] * world
            if dist.is_available() and dist.is_initialized():
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:  # (4) one copy of the state: rank 0 writes, Ray uploads it
                    save_checkpoint(
                        {
                            "model": bare.state_dict(),
                            "optimizer": opt.state_dict(),
                            "epoch": epoch,
                            "step": step,
                            "history": history,
                            "plateau": plateau,
                            "warm": warm,
                            "rng": rngs,
                            "config": loop_config["train"],
                            "classes": list(classes),
                        },
                        Path(tmp),
                    )
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(report)
        if rank == 0:
            # After the report: an epoch lost to a failure before its checkpoint is re-run, and the
            # logger skips epochs already logged, so MLflow never counts an epoch twice.
            logger.log(epoch, step, metrics)
            epoch_seconds.append(time.perf_counter() - epoch_start)
            left = cfg.schedule.epochs - epoch - 1
            eta = left * sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
            say(
                f"[{label}] epoch {epoch + 1}/{cfg.schedule.epochs}  loss {metrics['train_loss']:.3f}  "
                f"train err {metrics['train_top1_err']:.2f}%  val err {val['top1_err']:.2f}% "
                f"(top-5 {val['top5_err']:.2f}%)  lr {lr:.4g}  {metrics['images_per_sec']:.0f} img/s  "
                f"{epoch_seconds[-1]:.0f} s/epoch  ETA {_duration(eta)}"
                f"{f'  skipped {skipped:.0f} bad samples' if cfg.data.on_error == 'skip' else ''}"
            )
        if last:
            break  # max_iters reached before the last epoch


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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


def preflight(cfg: TrainConfig, storage: str, checked: bool = False) -> tuple[str, dict]:
    """Everything the driver can check before Ray Train starts (seconds, one line per failure):
    paths resolved where the user ran the command, the manifest readable with both splits, the
    storage writable, the MLflow store reachable. Returns (storage, manifest); `checked`: the caller
    (a study or an ensemble) already probed the storage and the MLflow store, once for all its trials."""
    from . import preflight as checks
    from .cluster import storage_url, user_path

    cfg.data.url = user_path(cfg.data.url, "data.url")
    if cfg.data.cache_dir:
        cfg.data.cache_dir = user_path(cfg.data.cache_dir, "data.cache_dir")
    storage = storage_url(storage)
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
        label: str | None = None, checked: bool = False) -> FitResult:
    """Train `cfg` on the Ray cluster (starting a local one if needed); resume if this run exists.

    `checked`: the caller already ran the preflight checks (a study or ensemble checks once for all)."""
    import mlflow

    storage, manifest = preflight(cfg, storage, checked)
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
        return _fit_run(cfg, storage, manifest, client, uri, run_id, name, label)
    except BaseException as e:  # any failure once the run exists: FAILED, with the error, never left RUNNING
        tracking.mark_failed(client, run_id, root_cause(e) if isinstance(e, ray.train.TrainingFailedError) else e)
        if isinstance(e, ray.train.TrainingFailedError):
            raise TrainingFailed(f"{label}: {root_cause(e)}") from None
        raise


def _fit_run(cfg: TrainConfig, storage: str, manifest: dict, client, uri: str, run_id: str, name: str, label: str) -> FitResult:
    from .cluster import forwarded_env, storage_for_ray

    tracking.log_dict(client, run_id, to_dict(cfg), "config/train_config.json")
    for split, context in ((cfg.data.train_split, "training"), (cfg.data.val_split, "validation")):
        tracking.log_dataset(client, run_id, manifest, cfg.data.url, split, context)
    print(f"[train] {label}: run {name}  (MLflow run {run_id} at {uri})", flush=True)
    callbacks = []
    if _in_tune_session():  # per-epoch metrics to Tune (for schedulers such as ASHA)
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
    from mlflow.models import infer_signature

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
