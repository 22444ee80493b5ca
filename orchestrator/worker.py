"""The loop each Ray Train worker runs, as a recipe in four parts.

    start              the rank's context, the model and optimizer, and the position to resume from
    train_steps        a range of global steps of one epoch, from that position (`step.train_step`)
    checkpoint_report  a checkpoint with the position and the state the next step needs, reported to Ray
    end_epoch          evaluation, the epoch's report, its MLflow metrics and its console line

The data order is a function of the run, not of the cluster (`pipelines.make_loader` with the global
batch): global step t of an epoch holds the same samples, augmented alike, whatever the world size. So a
checkpoint is a position (epoch, step in the epoch) plus weights, optimizer, the EMA of the weights
(`ema.decay`) and a few counters, and a run resumed from it, at any world size, trains on exactly what an
uninterrupted run would have. The torch RNG is re-seeded from (seed, step, rank) before every step
(`step.step_seed`), so nothing random needs saving (MixUp / CutMix draw from it too, and pair samples
within a rank's share). At the same world size on the CPU, a resumed run ends bit for bit where an
uninterrupted one does.

Barriers: `ray.train.report` and `ray.train.get_preemption_info` wait for every rank, so every rank calls
them at the same global steps: checkpoints every `checkpoint.every_steps` steps and at epoch ends, and
at "poll" steps (every `checkpoint.preemption_poll_steps`, by default about every 5 s of training,
agreed between the ranks at the start) the preemption check and the `every_minutes` clock, which rank 0
decides and the others follow through one all-reduce.

Ray lives here and in the driver (`orchestrator.train`); the step, the model, the optimizer and the
evaluation are Ray-free (`orchestrator.step`). The worker knows nothing of Tune.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import pipelines

from . import tracking
from .checkpoints import (
    CHECKPOINT_FILE,
    CheckpointIntegrityError,
    checkpoint_url,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, derived, from_dict
from .step import (
    StepOptions,
    Transformed,
    all_reduce_sum,
    build_model,
    evaluate,
    lr_at,
    make_batch_transforms,
    make_ema,
    make_optimizer,
    make_transforms,
    step_seed,
    to_device,
    train_step,
    update_ema,
)

POLL_TARGET_S = 5.0  # default time between preemption polls (Ray's watcher looks at the drains every 5 s)
TIMING_STEPS = 3  # steps of each attempt timed before the ranks agree on the poll interval


def say(line: str) -> None:
    """One line to the console, once (Ray's print patch is off in our workers: see `orchestrator.train`)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class Progress:
    """Where the run is, and every number the next step needs besides weights and optimizer: what a
    checkpoint carries. Sums over the epoch so far are global (all ranks), so a resume at another
    world size still reports the epoch's exact training loss and error."""

    epoch: int = 0  # the epoch being trained
    step_in_epoch: int = 0  # its steps already trained
    step: int = 0  # global steps trained since the start of the run
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch
    plateau: dict = field(default_factory=lambda: {"scale": 1.0, "best": float("inf"), "bad": 0})
    warm: bool = False  # v1 ResNet-110 warm-up still on
    partial: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "seen": 0.0, "skipped": 0.0, "seconds": 0.0})
    world_sizes: list = field(default_factory=list)  # [first global step, world size] per attempt that changed it
    done: bool = False  # schedule.max_iters reached


@dataclass
class Run:
    """One attempt of one rank: what it built at the start (not checkpointed)."""

    cfg: TrainConfig
    loop_config: dict
    label: str
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped (and compiled) for the step
    bare: torch.nn.Module  # the net itself, for evaluation and checkpoints
    opt: torch.optim.Optimizer
    options: StepOptions
    classes: list
    progress: Progress
    train_tf: object
    train_btf: object  # data.decode_on=gpu: decoding + augmentation of encoded batches on the device
    val_loader: object
    logger: tracking.EpochLogger | None
    manifest: dict = field(default_factory=dict)  # the data's (mean/std: the transforms of each epoch)
    ema: torch.nn.Module | None = None  # ema.decay: the AveragedModel of `bare`
    poll_every: int = 0  # steps between polls; 0 until the ranks agreed on it
    started: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)
    preemptions: dict = field(default_factory=dict)  # drained node ids -> "first" / "last" checkpoint taken
    last_poll: float = 0.0
    poll_seconds: float = POLL_TARGET_S  # measured between polls
    checkpoint_seconds: float = 1.0  # the latest checkpoint's wall time (report and commit)
    clock: float = 0.0  # when the training time of the epoch was last added up
    step_times: list = field(default_factory=list)
    last_tick: float = 0.0
    lr: float = 0.0  # of the latest step
    epoch_walls: list = field(default_factory=list)  # wall seconds of this attempt's epochs, for the ETA
    epoch_started: float = field(default_factory=time.monotonic)
    attempt: str = ""  # debug.trace_dir: this attempt's id
    # Device-side sums of this attempt's steps in the current epoch (no host sync per step).
    sums: list = field(default_factory=list)


def train_loop_per_worker(loop_config: dict) -> None:
    run = start(loop_config)
    cfg = run.cfg
    for epoch in range(run.progress.epoch, cfg.schedule.epochs):
        if run.progress.done:
            break
        train_steps(run, epoch)
        end_epoch(run, epoch)


# ---------------------------------------------------------------------------------------------
# 1. Start: context, model, optimizer, resume.


def start(loop_config: dict) -> Run:
    # Ray Train puts the root logger at INFO on the console in workers: its own per-report INFO line
    # (a logger named by file path, out of LoggingConfig's reach) and botocore's per-request lines
    # reached the user. Our progress is one line per epoch; warnings still show.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(TrainConfig, loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    manifest = pipelines.read_manifest(cfg.data.url)
    classes = list(manifest["classes"])
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    bare = build_model(cfg, len(classes), device, world)
    opt = make_optimizer(bare, cfg, derived(cfg)["lr_scaled"], device)
    ema = make_ema(bare, derived(cfg)["ema_decay_per_update"]) if cfg.ema.decay else None
    label = loop_config.get("label") or loop_config.get("name", cfg.model.name)
    progress = resume(cfg, bare, opt, rank, world, label, ema)

    # (1) DDP on this worker's device: gloo on CPU, NCCL on GPU.
    model = ray.train.torch.prepare_model(bare)
    bare = model.module if hasattr(model, "module") else model
    if cfg.scaling.compile:  # after DDP wrapping, so DDP's bucketed all-reduce still overlaps the backward
        model = torch.compile(model)

    gpu_decode = cfg.data.decode_on == "gpu"
    if gpu_decode:  # loader processes only read shards; nvJPEG + crops on the device
        train_btf, test_btf = make_batch_transforms(cfg, manifest, device)
        train_tf = test_tf = None
    else:
        (train_tf, test_tf), train_btf = make_transforms(cfg, manifest), None
    val_loader = pipelines.make_loader(
        cfg.data.url, cfg.data.val_split, derived(cfg)["per_worker_batch"], transform=test_tf, shuffle=False,
        **_loader_args(cfg, rank, world, device),
    )
    if gpu_decode:
        val_loader = Transformed(val_loader, test_btf)
    # MLflow's HTTP retries wait 2, 4, 8, 16, 32 s...; waits of 1, 2, 4, 8, 16 s find a server that is
    # back sooner after a short outage (10 attempts still cover about 15 minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    logger = tracking.EpochLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    run = Run(cfg, loop_config, label, rank, world, device, model, bare, opt,
              StepOptions.of(cfg, device, world, num_classes=len(classes)), classes, progress, train_tf, train_btf,
              val_loader, logger, manifest=manifest, ema=ema, poll_every=cfg.checkpoint.preemption_poll_steps)
    _note_world_size(run)
    return run


def resume(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, world: int,
           label: str, ema: torch.nn.Module | None = None) -> Progress:
    """The position and state of the latest committed checkpoint (verified), or a fresh start."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return Progress(warm=cfg.schedule.warmup_lr > 0)
    with ckpt.as_directory() as ckpt_dir:
        state = load_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, f"{checkpoint_url(ckpt)}/{CHECKPOINT_FILE}")
    if (ema is not None) != ("ema" in state):
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint_url(ckpt)} was written {'with' if 'ema' in state else 'without'} an EMA of the "
            f"weights and this run has ema.decay={cfg.ema.decay}: start a new run (another tracking.run_name)")
    if ema is not None:  # "model" is the average (what the run delivers); "raw_model" the trained weights
        model.load_state_dict(state["raw_model"])
        ema.module.load_state_dict(state["model"])
        ema.n_averaged.fill_(int(state["ema"]["n_averaged"]))
    else:
        model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if "progress" not in state:
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint_url(ckpt)} has no position (written before step-exact resume): start a new "
            "run (another tracking.run_name or --storage), or delete that run's folder")
    progress = Progress(**state["progress"])
    if rank == 0:
        where = f"epoch {progress.epoch + 1}" + (f" step {progress.step_in_epoch}" if progress.step_in_epoch else "")
        say(f"[{label}] resume from {where} (iteration {progress.step}) on {world} worker(s), "
            f"checkpoint {checkpoint_url(ckpt)}")
    else:  # the epoch's sums so far are global: rank 0 carries them, the others start from zero
        progress.partial = {k: 0.0 for k in progress.partial}
    return progress


def _note_world_size(run: Run) -> None:
    """One line, and the MLflow metric `world_size` at this step, when the run starts or its size changed."""
    p = run.progress
    before = p.world_sizes[-1][1] if p.world_sizes else None
    if before == run.world:
        return
    p.world_sizes.append([p.step, run.world])
    if run.rank == 0:
        change = f"{before} -> {run.world}" if before else f"{run.world}"
        say(f"[{run.label}] world size {change} at iteration {p.step} (epoch {p.epoch + 1}, step {p.step_in_epoch})")
        run.logger.log_step(p.step, {"world_size": run.world})


def _loader_args(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    return dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.seed,
                cache_dir=cfg.data.cache_dir or None, pin_memory=device.type == "cuda",
                decode=cfg.data.decode_on != "gpu")


# ---------------------------------------------------------------------------------------------
# 2. A range of steps of one epoch.


def train_steps(run: Run, epoch: int) -> None:
    """Train epoch `epoch` from the position in `run.progress` to its end (or to schedule.max_iters)."""
    cfg, p = run.cfg, run.progress
    if cfg.data.progressive.min_size:  # FFCV's progressive resizing: this epoch's train crop
        if run.train_btf is not None:
            run.train_btf = make_batch_transforms(cfg, run.manifest, run.device, epoch=epoch)[0]
        else:
            run.train_tf = make_transforms(cfg, run.manifest, epoch=epoch)[0]
    # (2) The loader yields this rank's share of every global batch from `start_step` on, the same
    # number of steps on every rank, so DDP's all-reduce never waits on a rank that ran dry.
    loader = pipelines.make_loader(
        cfg.data.url, cfg.data.train_split, global_batch_size=cfg.optim.batch_size, epoch=epoch,
        start_step=p.step_in_epoch, transform=run.train_tf, shuffle=True, shuffle_buffer=cfg.data.shuffle_buffer,
        streams=cfg.data.streams, on_error=cfg.data.on_error, with_keys=bool(cfg.debug.trace_dir),
        **_loader_args(cfg, run.rank, run.world, run.device),
    )
    steps_per_epoch = loader.steps_per_epoch
    run.model.train()  # evaluation left it in eval mode
    run.sums = [torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0]
    run.clock = time.perf_counter()
    for batch in loader:
        started = time.perf_counter()
        images, labels = batch[0], batch[1]
        if run.train_btf is not None:
            images = run.train_btf(images)
        _maybe_kill(run)
        torch.manual_seed(step_seed(cfg.seed, p.step, run.rank))  # the model's own randomness, keyed
        images, labels = to_device(images, labels, run.options)
        lr = cfg.schedule.warmup_lr if p.warm else lr_at(cfg, derived(cfg)["lr_scaled"], p.step, steps_per_epoch, p.plateau["scale"])
        run.lr = lr
        loss, correct = train_step(run.model, run.opt, images, labels, lr, run.options)
        if run.ema is not None and p.step_in_epoch % cfg.ema.every_steps == 0:  # torchvision: after steps 0, k, 2k..
            update_ema(run.ema, run.bare, restart=epoch < cfg.schedule.warmup_epochs)
        run.sums[0] += loss
        run.sums[1] += correct
        run.sums[2] += len(labels)
        p.step += 1
        p.step_in_epoch += 1
        if cfg.debug.trace_dir:
            _trace(run, epoch, batch[2])
        if cfg.debug.min_step_seconds:  # a drill's pace (debug.min_step_seconds)
            time.sleep(max(0.0, cfg.debug.min_step_seconds - (time.perf_counter() - started)))
        if p.warm:
            _end_warmup(run, correct, len(labels))
        if cfg.schedule.max_iters and p.step >= cfg.schedule.max_iters:
            p.done = True  # v1 CIFAR: stop at 64k iterations, not at a whole number of epochs
            break
        if p.step_in_epoch < steps_per_epoch:  # the epoch's end has its own report
            _between_steps(run)
    p.partial["seconds"] += time.perf_counter() - run.clock
    p.partial["skipped"] += float(getattr(loader, "skipped", 0))


def _between_steps(run: Run) -> None:
    """Checkpoints between epochs: every `every_steps` steps, at a preemption notice, and on the clock."""
    cfg, p = run.cfg, run.progress
    now = time.perf_counter()
    if not run.poll_every and run.last_tick and len(run.step_times) < TIMING_STEPS:
        run.step_times.append(now - run.last_tick)  # wall time per step (data included), after the first
        if len(run.step_times) == TIMING_STEPS:  # every rank gets here at the same step: agree on the interval
            slowest = _all_max(max(run.step_times), run.device)
            run.poll_every = max(1, min(1000, round(POLL_TARGET_S / max(slowest, 1e-3))))
    run.last_tick = now
    reason = "every_steps" if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0 else ""
    if run.poll_every and p.step % run.poll_every == 0:
        info = ray.train.get_preemption_info()  # a barrier: every rank calls it at this step
        if info is not None and _preemption_checkpoint_due(run, info):
            reason = "preemption"
        if run.last_poll:
            run.poll_seconds = now - run.last_poll
        run.last_poll = now
        due = cfg.checkpoint.every_minutes and time.monotonic() - run.last_checkpoint >= 60 * cfg.checkpoint.every_minutes
        if not reason and cfg.checkpoint.every_minutes and _all_max(float(bool(due and run.rank == 0)), run.device):
            reason = "every_minutes"
    if reason:
        p.partial["seconds"] += time.perf_counter() - run.clock
        checkpoint_report(run, kind=reason)
        run.clock = time.perf_counter()  # the checkpoint's own time is not training time


def _preemption_checkpoint_due(run: Run, info) -> bool:
    """A node is being drained: checkpoint at the first poll that sees it, and once more at the last poll
    that still leaves time for a checkpoint before the deadline (the steps between the two are not lost).
    Rank 0's clock decides; the others follow (one all-reduce)."""
    key = frozenset(info.preempted_node_ids)
    left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else float("nan")
    if key not in run.preemptions:
        run.preemptions[key] = "first"
        if run.rank == 0:
            say(f"[{run.label}] node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} will be preempted "
                f"in {left:.0f} s (ranks {info.preempted_ranks}): checkpoint at iteration {run.progress.step}")
        return True
    if run.preemptions[key] != "first" or not info.deadline_ms:
        return False
    # Too late at the next poll? A checkpoint takes about as long as the first one did.
    late = left < 2 * run.checkpoint_seconds + 1.5 * run.poll_seconds + 1.0
    if not _all_max(float(late and run.rank == 0), run.device):
        return False
    run.preemptions[key] = "last"
    if run.rank == 0:
        say(f"[{run.label}] {left:.0f} s before the preemption deadline: checkpoint at iteration {run.progress.step}")
    return True


def _all_max(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _end_warmup(run: Run, correct: torch.Tensor, n: int) -> None:
    """v1: ResNet-110 warms up until the training error drops below 80 % (all ranks agree)."""
    s, p = run.cfg.schedule, run.progress
    c, total = all_reduce_sum([float(correct), float(n)], run.device)
    if (s.warmup_iters and p.step >= s.warmup_iters) or (s.warmup_until_train_err and 100 * (1 - c / total) < s.warmup_until_train_err):
        p.warm = False


def _maybe_kill(run: Run) -> None:
    """Fault drills: SIGKILL the last rank's process once, just before global step `debug.kill_worker_at_step`
    (or the first step of epoch `debug.kill_worker_at_epoch`)."""
    d, p = run.cfg.debug, run.progress
    at = d.kill_worker_at_step == p.step or (d.kill_worker_at_epoch == p.epoch and p.step_in_epoch == 0)
    if at and run.rank == run.world - 1 and d.kill_marker:
        marker = Path(d.kill_marker)
        if not marker.exists():
            # The kill lands after the latest reported checkpoint is committed, so the drill knows where
            # the run resumes from (uploads and their registration run behind the training otherwise).
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            marker.write_text(f"killed rank {run.rank} before iteration {run.progress.step}\n")
            say(f"[fault drill] SIGKILL of worker rank {run.rank} before iteration {run.progress.step}")
            os.kill(os.getpid(), signal.SIGKILL)


def _trace(run: Run, epoch: int, keys: list) -> None:
    """Fault drills: which samples this rank trained at which step, one JSON line per step."""
    folder = Path(run.cfg.debug.trace_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not run.attempt:  # one id per attempt, the same on every rank (rank 0's)
        box = [uuid.uuid4().hex[:12]]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        run.attempt = box[0]
    line = {"epoch": epoch, "step": run.progress.step_in_epoch - 1, "iteration": run.progress.step - 1,
            "rank": run.rank, "world": run.world, "attempt": run.attempt, "keys": list(keys)}
    with open(folder / f"rank{run.rank}-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint and report.


def checkpoint_report(run: Run, kind: str, metrics: dict | None = None) -> None:
    """Fold this attempt's sums into the position, then report it with a checkpoint (a barrier: every
    rank calls it). Rank 0 writes the one copy of the state; Ray uploads it, in the background except
    when a node is about to go or the run ends."""
    p = run.progress
    started = time.monotonic()
    # At most one checkpoint in flight: Ray's controller registers one report per poll (2 s), so
    # checkpoints taken faster than that would queue up behind uploads and a failure would resume from
    # far back. Waiting for the previous one costs nothing when checkpoints are minutes apart.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    loss, correct, seen = all_reduce_sum([float(run.sums[0]), float(run.sums[1]), float(run.sums[2])], run.device)
    if run.rank == 0:
        p.partial.update(loss=p.partial["loss"] + loss, correct=p.partial["correct"] + correct, seen=p.partial["seen"] + seen)
        if kind != "epoch":  # the epoch so far, at this step (logged once per step, restarts included)
            seen = max(p.partial["seen"], 1)
            run.logger.log_step(p.step, {"step_train_loss": p.partial["loss"] / seen,
                                         "step_train_top1_err": 100 * (1 - p.partial["correct"] / seen)})
    else:
        p.partial.update(loss=0.0, correct=0.0, seen=0.0)
    run.sums = [torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0]
    final = kind == "epoch" and (p.done or p.epoch >= run.cfg.schedule.epochs)
    sync = kind == "preemption" or final
    folder = None
    checkpoint = None
    if run.rank == 0:  # (3) one copy of the state: rank 0 writes, Ray uploads it
        folder = Path(tempfile.mkdtemp(prefix="ckpt-"))  # async uploads read it after report() returns
        state = {"model": run.bare.state_dict(), "optimizer": run.opt.state_dict(), "progress": asdict(p),
                 "epoch": p.epoch - 1, "step": p.step, "history": p.history,  # epoch: the last one finished
                 "config": run.loop_config["train"], "classes": run.classes, "kind": kind}
        if run.ema is not None:  # the run's model is the average; the trained weights resume training
            state.update(model=run.ema.module.state_dict(), raw_model=run.bare.state_dict(),
                         ema={"n_averaged": int(run.ema.n_averaged)})
        state["progress"]["partial"] = dict(p.partial)  # the global sums (rank 0 holds them)
        save_checkpoint(state, folder)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    name = f"epoch_{p.epoch - 1:04d}" if kind == "epoch" else f"step_{p.step:08d}"
    # Ray keeps the `checkpoint.keep_best` best by `retention_score` (the latest always): the val error at
    # an epoch's end, and 101 (worse than any error %) between epochs, so those go first.
    report = {"kind": kind, "epoch": p.epoch - (kind == "epoch"), "step": p.step, **(metrics or {}),
              "retention_score": (metrics or {}).get("val_top1_err", 101.0)}
    mode = ray.train.CheckpointUploadMode.SYNC if sync else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_mode=mode)
    if folder is not None and sync:
        shutil.rmtree(folder, ignore_errors=True)
    if kind == "preemption":  # the node may go any moment: go on only once Ray has committed it
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    run.last_checkpoint = time.monotonic()
    run.checkpoint_seconds = run.last_checkpoint - started


# ---------------------------------------------------------------------------------------------
# 4. The end of an epoch: evaluation, report, logging.


def end_epoch(run: Run, epoch: int) -> None:
    cfg, p = run.cfg, run.progress
    val = evaluate(run.bare, run.val_loader, run.device)
    ema = evaluate(run.ema.module, run.val_loader, run.device) if run.ema is not None else None
    if cfg.schedule.kind == "plateau":  # /10 when val error has not improved for `patience` epochs
        if val["top1_err"] < p.plateau["best"] - 1e-6:
            p.plateau.update(best=val["top1_err"], bad=0)
        else:
            p.plateau["bad"] += 1
            if p.plateau["bad"] >= cfg.schedule.plateau_patience:
                p.plateau.update(scale=p.plateau["scale"] * cfg.schedule.gamma, bad=0)
    loss, correct, seen = all_reduce_sum([float(run.sums[0]), float(run.sums[1]), float(run.sums[2])], run.device)
    skipped = all_reduce_sum([p.partial["skipped"]], run.device)[0]
    part = p.partial
    loss, correct, seen = loss + part["loss"], correct + part["correct"], seen + part["seen"]
    metrics = {
        "train_loss": loss / max(seen, 1),
        "train_top1_err": 100 * (1 - correct / max(seen, 1)),
        "val_loss": val["loss"],
        "val_top1_err": val["top1_err"],
        "val_top5_err": val["top5_err"],
        "lr": run.lr,
        "images_per_sec": seen / max(part["seconds"], 1e-9),
        "skipped_samples": skipped,
    }
    if ema is not None:
        metrics.update(val_loss_ema=ema["loss"], val_top1_err_ema=ema["top1_err"], val_top5_err_ema=ema["top5_err"])
    p.history.append({"epoch": epoch, "step": p.step, "world_size": run.world, **metrics})
    p.epoch, p.step_in_epoch = epoch + 1, 0
    p.partial = {k: 0.0 for k in p.partial}
    run.sums = [torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0]
    last = p.done or p.epoch >= cfg.schedule.epochs
    if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or last:
        checkpoint_report(run, "epoch", metrics)
    else:
        ray.train.report({"kind": "epoch", "epoch": epoch, "step": p.step, **metrics})
    run.epoch_walls.append(time.monotonic() - run.epoch_started)
    run.epoch_started = time.monotonic()
    if run.rank == 0:  # after the report: an epoch redone after a failure is not logged twice
        log_epoch(run, epoch, metrics)


def log_epoch(run: Run, epoch: int, metrics: dict) -> None:
    cfg = run.cfg
    run.logger.log(epoch, run.progress.step, metrics)
    recent = run.epoch_walls[-3:]
    eta = (cfg.schedule.epochs - epoch - 1) * sum(recent) / len(recent)
    skipped = f"  skipped {metrics['skipped_samples']:.0f} bad samples" if cfg.data.on_error == "skip" else ""
    ema = f", EMA {metrics['val_top1_err_ema']:.2f}%" if "val_top1_err_ema" in metrics else ""
    say(
        f"[{run.label}] epoch {epoch + 1}/{cfg.schedule.epochs}  loss {metrics['train_loss']:.3f}  "
        f"train err {metrics['train_top1_err']:.2f}%  val err {metrics['val_top1_err']:.2f}% "
        f"(top-5 {metrics['val_top5_err']:.2f}%{ema})  lr {metrics['lr']:.4g}  {metrics['images_per_sec']:.0f} img/s  "
        f"{run.epoch_walls[-1]:.0f} s/epoch  ETA {_duration(eta)}{skipped}"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
