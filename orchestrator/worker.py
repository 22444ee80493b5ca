"""The loop each Ray Train worker runs: resume, train, evaluate, checkpoint and report, log.

Ray lives here and in the driver (`orchestrator.train`); the step itself, the model, the optimizer and
the evaluation are Ray-free (`orchestrator.step`). The worker knows nothing of Tune.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
import pipelines

from . import tracking
from .checkpoints import CHECKPOINT_FILE, checkpoint_url, load_checkpoint, save_checkpoint
from .config import TrainConfig, derived, from_dict
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
