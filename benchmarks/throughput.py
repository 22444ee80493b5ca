"""Throughput of the training recipe, piece by piece, on one machine (`bench_train.py` is its command).

  model only    forward + backward + SGD step on synthetic tensors already on the device
  loader        read + decode + augment from shards (images/s one training worker's loader delivers)
  end to end    shards -> loader -> model on Ray Train (TorchTrainer), the same loop as `plain DDP`
  plain DDP     that loop in processes started by torch.multiprocessing (no Ray)

The ratios: data stall = end to end / (workers x model only); Ray Train / plain DDP. MFU: achieved
FLOP/s = 3 (forward + backward) x 2 (multiply-add = 2 FLOPs) x count_flops(model) x images/s, over the
device's dense peak. Every piece is built from one TrainConfig (a recipe with the bench's overrides)
and runs the product's own pieces: `orchestrator.step` (model, optimizer, learning-rate schedule, the
training step with its loss scale, label smoothing and autocast; transforms) and `pipelines.make_loader`,
so the bench measures what training runs. Results go to MLflow (experiment "bench") and to an entry
of the root BENCHMARKS.md. Over 500 lines because the four measurements share their setup and their
recording (device, versions, MFU, the entry): in one file they stay comparable.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import models
import pipelines
from orchestrator import step, tracking
from orchestrator.config import TrainConfig, derived, from_dict, to_dict
from orchestrator.local_cluster import free_ports

# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's datasheets; first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.7}),  # SXM
    ("H200", {"bf16": 989.0, "tf32": 494.7}),
    ("A100", {"bf16": 312.0, "tf32": 156.0}),
)

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
clock = time.perf_counter  # what the rates are timed with


# ---------------------------------------------------------------------------------------------
# Device, versions, FLOPs.


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def versions() -> dict:
    import mlflow
    import ray
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
    }


def peak_tflops(name: str, precision: str, override: float | None = None) -> float | None:
    """The device's dense peak for `precision` ("bf16" or "tf32"); None when unknown (CPUs)."""
    if override:
        return override
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS if key in name), None)


def train_flops_per_image(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one training step per image: backward ~ 2 x forward, a multiply-add is 2 FLOPs."""
    return 3 * 2 * models.count_flops(model, (3, size, size))


def mfu(flops_per_image: float, images_per_sec: float, peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s, model FLOPs utilisation in [0, 1] or None without a peak)."""
    achieved = flops_per_image * images_per_sec / 1e12
    return achieved, (achieved / peak if peak else None)


# ---------------------------------------------------------------------------------------------
# What to run: the recipe's config plus step counts.


@dataclass
class BenchSpec:
    cfg: TrainConfig  # model, data (url, size, decode_on, loader workers), scaling; optim.batch_size is global
    steps: int = 5  # timed steps per measurement
    warmup: int = 2  # untimed steps first (allocators, cuDNN autotuning, torch.compile, loader start-up)
    extra: dict = field(default_factory=dict)


def worker_device(cfg: TrainConfig, rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{rank}") if cfg.scaling.use_gpu else torch.device("cpu")


def setup_worker(cfg: TrainConfig, device: torch.device) -> None:
    """Per process: cuDNN autotuning on GPU; on CPU the model's threads are the worker's cores less its
    loader processes (OpenMP threads that share cores with the loader spin and stall each other)."""
    if device.type == "cuda":
        from torch.backends import cudnn  # here, not a global: Ray pickles this module's code by value

        cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker) - cfg.data.num_workers))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """The recipe's training step on one rank: `orchestrator.step.train_step` at the schedule's learning
    rate, with the recipe's SGD and, when asked, torch.compile (as the worker applies it, last)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int = 1,
                 steps_per_epoch: int = 1 << 30):
        self.cfg, self.steps_per_epoch, self.it = cfg, steps_per_epoch, 0
        self.lr = derived(cfg)["lr_scaled"]
        self.options = step.StepOptions.of(cfg, device, world)
        self.opt = step.make_optimizer(model, cfg, self.lr, device)
        self.model = torch.compile(model) if cfg.scaling.compile else model

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, labels = step.to_device(images, labels, self.options)
        lr = step.lr_at(self.cfg, self.lr, self.it, self.steps_per_epoch, 1.0)
        loss_sum, _ = step.train_step(self.model, self.opt, images, labels, lr, self.options)
        self.it += 1
        return loss_sum


# ---------------------------------------------------------------------------------------------
# (1) Model only.


def model_rate(spec: BenchSpec, num_classes: int) -> float:
    """Images/s of training steps on one device, on synthetic tensors already there."""
    cfg = spec.cfg
    device = worker_device(cfg)
    setup_worker(cfg, device)
    per_worker = derived(cfg)["per_worker_batch"]
    torch.manual_seed(0)
    stepper = Stepper(cfg, step.build_model(cfg, num_classes, device), device)
    x = torch.randn(per_worker, 3, cfg.data.size, cfg.data.size, device=device)
    y = torch.randint(0, num_classes, (per_worker,), device=device)
    for _ in range(spec.warmup):
        stepper(x, y)
    sync(device)
    t0 = clock()
    for _ in range(spec.steps):
        stepper(x, y)
    sync(device)
    return spec.steps * per_worker / (clock() - t0)


# ---------------------------------------------------------------------------------------------
# (2) The loader (one training worker's).


def train_batches(cfg: TrainConfig, manifest: dict, device: torch.device, rank: int = 0, world: int = 1):
    """Endless training batches (epoch after epoch) of one rank, made as the recipe makes them."""
    per_worker = derived(cfg)["per_worker_batch"]
    gpu_decode = cfg.data.decode_on == "gpu"
    rng = torch.Generator()
    if gpu_decode:
        batch_tf, _ = step.make_batch_transforms(cfg, manifest, device, rng)
    tf = None if gpu_decode else step.make_transforms(cfg, manifest)[0]
    epoch = 0
    while True:
        loader = pipelines.make_loader(
            cfg.data.url, cfg.data.train_split, per_worker, rank=rank, world_size=world, epoch=epoch,
            num_workers=cfg.data.num_workers, transform=tf, decode=not gpu_decode, pin_memory=device.type == "cuda",
            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed,
        )
        if gpu_decode:
            rng.manual_seed(epoch * 1_009 + rank)
            loader = step.Transformed(loader, batch_tf)
        yield from loader
        epoch += 1


def loader_rate(spec: BenchSpec) -> float:
    """Images/s of read + decode + augment (+ the copy to the device), after `warmup` batches."""
    cfg = spec.cfg
    device = worker_device(cfg)
    setup_worker(cfg, device)
    manifest = pipelines.read_manifest(cfg.data.url)
    batches = train_batches(cfg, manifest, device)
    for _ in range(spec.warmup):
        next(batches)
    seen = 0
    t0 = clock()
    for _ in range(spec.steps):
        images, labels = next(batches)
        images.to(device, non_blocking=True)
        seen += len(labels)
    sync(device)
    batches.close()
    return seen / (clock() - t0)


# ---------------------------------------------------------------------------------------------
# (3) End to end: one loop, run by Ray Train and by plain DDP.


def timed_loop(spec: BenchSpec, rank: int, world: int, device: torch.device) -> float:
    """Shards -> loader -> training steps on every rank; images/s of all ranks together, after warm-up."""
    cfg = spec.cfg
    setup_worker(cfg, device)
    manifest = pipelines.read_manifest(cfg.data.url)
    torch.manual_seed(cfg.seed)
    model = step.build_model(cfg, len(manifest["classes"]), device, world)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = max(1, manifest["splits"][cfg.data.train_split]["num_samples"] // cfg.optim.batch_size)
    stepper = Stepper(cfg, model, device, world, steps_per_epoch)
    batches = train_batches(cfg, manifest, device, rank, world)
    for _ in range(spec.warmup):
        stepper(*next(batches))
    sync(device)
    if world > 1:
        dist.barrier()
    seen = 0
    t0 = clock()
    for _ in range(spec.steps):
        images, labels = next(batches)
        stepper(images, labels)
        seen += len(labels)
    sync(device)
    if world > 1:
        dist.barrier()
    batches.close()
    rate = torch.tensor([seen / (clock() - t0)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(rate)
    return float(rate)


def _ddp_worker(rank: int, world: int, port: int, spec_dict: dict, out_file: str) -> None:
    # A child of torch.multiprocessing.spawn inherits "spawn" as its start method, so its DataLoader
    # workers would re-import torch every epoch; Ray's workers (and a shell's) fork them. Same here.
    multiprocessing.set_start_method(None, force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    spec = BenchSpec(from_dict(TrainConfig, spec_dict["cfg"]), spec_dict["steps"], spec_dict["warmup"])
    device = worker_device(spec.cfg, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        rate = timed_loop(spec, rank, world, device)
        if rank == 0:
            Path(out_file).write_text(str(rate))
    finally:
        dist.destroy_process_group()


def plain_ddp_rate(spec: BenchSpec) -> float:
    """The loop under plain PyTorch DDP: one process per worker, started by torch.multiprocessing."""
    world = spec.cfg.scaling.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        spec_dict = {"cfg": to_dict(spec.cfg), "steps": spec.steps, "warmup": spec.warmup}
        port = free_ports(1)[0]
        torch.multiprocessing.spawn(_ddp_worker, args=(world, port, spec_dict, out), nprocs=world, join=True)
        return float(Path(out).read_text())


def _ray_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    spec = BenchSpec(from_dict(TrainConfig, config["cfg"]), config["steps"], config["warmup"])
    ctx = ray.train.get_context()
    rate = timed_loop(spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    # Train V2 keeps only metrics reported with a checkpoint in the Result: rank 0 attaches a token one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            Path(tmp, "rate").write_text(str(rate))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"images_per_sec": rate}, checkpoint=checkpoint)  # a barrier: every rank reports once


def ray_train_rate(spec: BenchSpec) -> float:
    """The same loop under Ray Train's TorchTrainer (which sets up the process group: gloo or NCCL)."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from orchestrator.cluster import forwarded_env
    from orchestrator.preflight import Workers, preflight

    cfg = spec.cfg
    preflight(workers=[Workers.of(cfg, "the Ray Train benchmark")])
    # This module is a script's sibling, not an installed package: the workers get its code by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"cfg": to_dict(cfg), "steps": spec.steps, "warmup": spec.warmup},
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=f"bench-{time.time_ns()}", storage_path=storage, logging_config=LoggingConfig(log_level="WARNING"),
                worker_runtime_env={"env_vars": forwarded_env()},
            ),
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    return float(result.metrics["images_per_sec"])


# ---------------------------------------------------------------------------------------------
# Data: shards sized to the model input when none are given.


def synthetic_shards(out: str, size: int, images: int, classes: int = 1000) -> str:
    """JPEG shards whose sides lie in [8/7, 2] x size (256-448 px for 224), like ImageNet's photos."""
    lo, hi = round(size * 8 / 7), 2 * size
    spec = f"synthetic:classes={classes},size={lo}-{hi},train={images},val=0,format=jpg"
    pipelines.write_shards(spec, out, shard_size=max(64, images // 16), progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Running it all, and recording.


@dataclass
class BenchResult:
    metrics: dict  # numbers (MLflow metrics)
    params: dict  # what ran where (MLflow params)
    lines: list[str]  # the printed report
    verdicts: list[str]


def run(spec: BenchSpec, *, peak: float | None = None, parts: tuple[str, ...] = ("model", "loader", "ddp", "ray"), out=print) -> BenchResult:
    """Measure `parts` of `spec`; print one line per number as it arrives; return everything."""
    cfg = spec.cfg
    device = worker_device(cfg)
    name = device_name(device)
    manifest = pipelines.read_manifest(cfg.data.url)
    num_classes = len(manifest["classes"])
    world = cfg.scaling.num_workers
    precision = "bf16" if device.type == "cuda" and cfg.scaling.bf16 else ("tf32" if device.type == "cuda" else "fp32")
    per_worker = derived(cfg)["per_worker_batch"]
    fpi = train_flops_per_image(models.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.overrides), cfg.data.size)
    peak = peak_tflops(name, precision, peak) if precision != "fp32" or peak else None
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        out(text, flush=True) if out is print else out(text)

    say(f"device: {name}   " + "  ".join(f"{k} {v}" for k, v in versions().items()))
    say(
        f"{cfg.model.name} at {cfg.data.size} px, batch {per_worker} per worker x {world} worker(s), {precision}"
        f"{', channels_last' if device.type == 'cuda' and cfg.scaling.channels_last else ''}"
        f"{', torch.compile' if cfg.scaling.compile else ''}; decode on {cfg.data.decode_on}"
        f"{' (its CPU fallback: no GPU)' if cfg.data.decode_on == 'gpu' and device.type != 'cuda' else ''}, "
        f"{cfg.data.num_workers} loader process(es) per worker; {spec.warmup} warm-up + {spec.steps} timed steps"
    )
    say(f"data: {cfg.data.url} ({manifest['splits']['train']['num_samples']} train images); "
        f"{fpi / 6e9:.3f} GMACs forward per image")
    m: dict = {}
    if "model" in parts:
        m["model_only_img_s"] = model_rate(spec, num_classes)
        achieved, u = mfu(fpi, m["model_only_img_s"], peak)
        m["model_only_tflops"] = achieved
        say(f"(1) model only (synthetic tensors):  {m['model_only_img_s']:10.1f} img/s per worker   "
            f"{achieved:.3f} TFLOP/s   MFU " + (f"{100 * u:.1f} % of {peak:g} TFLOP/s" if u is not None else "n/a (unknown peak; --peak-tflops)"))
        if u is not None:
            m["model_only_mfu"] = u
    if "loader" in parts:
        m["loader_img_s"] = loader_rate(spec)
        say(f"(2) loader (read+decode+augment):    {m['loader_img_s']:10.1f} img/s per worker")
    if "ddp" in parts:
        m["plain_ddp_img_s"] = plain_ddp_rate(spec)
        say(f"    plain DDP (same loop, no Ray):   {m['plain_ddp_img_s']:10.1f} img/s")
    if "ray" in parts:
        m["end_to_end_img_s"] = ray_train_rate(spec)
        achieved, u = mfu(fpi, m["end_to_end_img_s"] / world, peak)
        say(f"(3) end to end on Ray Train:         {m['end_to_end_img_s']:10.1f} img/s   "
            + (f"MFU {100 * u:.1f} %" if u is not None else f"{achieved:.3f} TFLOP/s per worker"))
        if u is not None:
            m["end_to_end_mfu"] = u
    if "model_only_img_s" in m and "end_to_end_img_s" in m:
        m["data_stall_ratio"] = m["end_to_end_img_s"] / (world * m["model_only_img_s"])
        say(f"    end to end / ({world} x model only): {m['data_stall_ratio']:.3f}   (goal >= 0.90)")
    if "plain_ddp_img_s" in m and "end_to_end_img_s" in m:
        m["ray_over_ddp"] = m["end_to_end_img_s"] / m["plain_ddp_img_s"]
        say(f"    Ray Train / plain DDP:            {m['ray_over_ddp']:.3f}   (goal >= 0.97 on H100, >= 0.95 on CPU)")
    params = {
        "device": name,
        **{f"version.{k}": v for k, v in versions().items()},
        "model": cfg.model.name,
        "size": cfg.data.size,
        "batch_per_worker": per_worker,
        "workers": world,
        "loader_workers": cfg.data.num_workers,
        "decode_on": cfg.data.decode_on,
        "precision": precision,
        "channels_last": device.type == "cuda" and cfg.scaling.channels_last,
        "compile": cfg.scaling.compile,
        "steps": spec.steps,
        "warmup": spec.warmup,
        "data": cfg.data.url,
        "peak_tflops": peak or "unknown",
        **spec.extra,
    }
    return BenchResult(m, params, lines, goal_verdicts(m, name, cfg))


def goal_verdicts(m: dict, name: str, cfg: TrainConfig) -> list[str]:
    """One line per goal of issue 9 that this run can speak to."""
    out = []
    on_h100 = "H100" in name and cfg.data.size == 224 and cfg.scaling.bf16
    floor = {"resnet50": 3000, "resnet18": 9000}.get(cfg.model.name)
    if on_h100 and floor and "model_only_img_s" in m:
        ok = m["model_only_img_s"] >= floor
        out.append(f"{cfg.model.name} model only {m['model_only_img_s']:.0f} img/s (goal >= {floor} on one H100): {'met' if ok else 'NOT met'}")
    elif "model_only_img_s" in m:
        out.append("model-only goals (ResNet-50 >= 3,000 img/s, ResNet-18 >= 9,000 img/s) are for one H100 at 224 px bf16: not applicable here")
    if "data_stall_ratio" in m:
        ok = m["data_stall_ratio"] >= 0.90
        out.append(f"end to end / model only {m['data_stall_ratio']:.3f} (goal >= 0.90): {'met' if ok else 'NOT met'}")
    if "ray_over_ddp" in m:
        goal = 0.97 if cfg.scaling.use_gpu else 0.95
        ok = m["ray_over_ddp"] >= goal
        out.append(f"Ray Train / plain DDP {m['ray_over_ddp']:.3f} (goal >= {goal}): {'met' if ok else 'NOT met'}")
    return out


def log_mlflow(result: BenchResult, command: str, experiment: str = "bench", uri: str | None = None) -> str:
    """One MLflow run: params (device, versions, command, settings) and the numbers; returns its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or tracking.tracking_uri())
    exp_id = tracking.experiment_id(client, experiment)
    name = f"{result.params['model']}-{result.params['size']}px-{result.params['device'].replace(' ', '_')}"
    run = client.create_run(exp_id, run_name=name, tags={"git_commit": tracking.git_commit(), "mlflow.runName": name})
    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in {**result.params, "command": command}.items()]
    metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.log_text(run.info.run_id, "\n".join(result.lines + [""] + result.verdicts) + "\n", "bench.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def append_entry(
    path: str | Path, title: str, command: str, output: str, verdicts: list[str], *, machine: str | None = None, load: str | None = None
) -> str:
    """Append one entry to a BENCHMARKS.md-style file (header, date, machine, versions, load, command,
    printed output, one line per goal); returns the entry's text. `load`: the load averages to report
    (default: now, at the end)."""
    path = Path(path)
    v = versions()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    entry = "\n".join([
        f"## {title}",
        "",
        f"- date: {date}",
        f"- machine: {machine or device_name(torch.device('cpu'))}",
        f"- versions: torch {v['torch']}, torchvision {v['torchvision']}, ray {v['ray']}, mlflow {v['mlflow']}, python {v['python']}",
        f"- load average (1, 5, 15 min): {load or 'at the end ' + load_average()}",
        f"- command: `{command}`",
        "",
        "```text",
        output.rstrip("\n"),
        "```",
        "",
        *[f"Goal: {line}" for line in verdicts],
        "",
    ]) + "\n"
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured numbers only, newest last. Each entry: the exact command, the machine, its load, the output.\n\n")
    with path.open("a") as f:
        f.write(entry)
    return entry


def command_line() -> str:
    """The command that is running, as a user would type it again (for the record)."""
    import shlex

    if Path(sys.argv[0]).name.startswith("bench_"):
        return f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:])
    return "throughput.run (from Python)"
