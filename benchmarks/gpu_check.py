#!/usr/bin/env python
"""The GPU path, measured in one command: the project's own model, loader and training step on one device.

    python benchmarks/gpu_check.py                 # on any machine with a CUDA GPU (about 5-8 minutes)
    python benchmarks/gpu_check.py --cpu           # the same code paths on the CPU, tiny sizes (the test suite)
    bash benchmarks/gpu_check.sh                   # prepares the wheels and prints the device-tool call

Parts, in the order they run (each prints one line per number; all of them land in one JSON file,
``--out``/gpu_check.json, default ``$OUT`` where it is set):

  data      ImageNet-like JPEGs (about 500x375, quality 90) cut at random from the real photographs
            that scikit-image ships (and scikit-learn's two), written as shards by
            ``python -m pipelines.shards write --source imagefolder:DIR``; the digits demo shards.
  model     model only, per training step on synthetic tensors already on the device: ResNet-18/50/152
            at 224 px, batch 256, and CIFAR ResNet-20/110 at 32 px, batch 128; img/s, achieved TFLOP/s
            (3 x 2 x ``models.count_flops``) and MFU against a bf16 matmul peak measured first.
  loader    read + decode + augment at 224 px, ``decode_on=gpu`` (nvJPEG, crops as tensor ops) and
            ``cpu``, with 2, 8 and 14 loader processes: img/s delivered on the device.
  e2e       the training step fed by the loader (ResNet-50, decode on the GPU) over the same step on
            synthetic tensors, in one process: the data-stall ratio.
  eval      ``evaluate()`` with the 10-crop and the multi-scale test protocols: img/s.
  converge  ResNet-20 on the digits at 32 px with the demo's recipe, to the validation error the CPU
            demo reached (BENCHMARKS.md), and its wall time: the GPU path learns, not only runs.
  ddp       ``torch.distributed`` at world size 1 (NCCL refuses two ranks on one GPU; gloo with
            ``--cpu``): DDP all-reduces every gradient in one training step, and an explicit all-reduce.
  compile   ResNet-18/50/152 as in ``model`` under ``torch.compile`` (its compile time, and the ratio
            to eager). Last, because it is the slowest and takes what the time budget leaves.

Every part runs the project's code: ``models``, ``pipelines`` (``make_loader``, ``make_transform``,
``make_batch_transform``) and the Ray-free step of ``orchestrator.step`` (``build_model``,
``make_optimizer``, ``StepOptions``, ``to_device``, ``train_step``, ``evaluate``) with configs from
``orchestrator/configs``. Nothing here imports Ray or MLflow.

Robustness: the parts run in a child process that this one watches. Each part has a time limit, and
the whole check a budget (``--budget``); a part that raises, crashes the process or overruns its limit
is reported as failed (with what it measured so far) and the next part runs in a fresh child. The exit
code is 0 only when every part passed. Goals (e.g. ResNet-50 >= 3,000 img/s) are reported as met or not
met; they do not change the exit code.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data", "model", "loader", "e2e", "eval", "converge", "ddp", "compile")

# The project's dependencies that the GPU machine lacks (see the device tool's KINDS.md) and their own
# dependencies there. Ray (a 79 MB wheel) and MLflow cannot travel: the check must not need them. The
# small pure-Python ones may travel as wheels: `--print-wheels` names those our import path needs.
NEVER_THERE = ("ray", "mlflow")
MAY_TRAVEL = {  # distribution -> top-level module
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "boto3": "boto3",
    "botocore": "botocore",
    "s3transfer": "s3transfer",
    "jmespath": "jmespath",
}

# The validation error (%) of ResNet-20 in the CPU demo (BENCHMARKS.md, "The main job": 6.30 on
# 2026-11-23, 4.44 on 2026-11-24, 270 images, the ensemble's recipe below; 6.67 on 2026-12-01, after
# issue 19 made the sample order and the augmentations the run's). The check asks for the largest. Its
# `converge` loop on the CPU (fp32, 1 thread) ended at 4.44 % with seed 0, as the demo did, and at
# 8.52 % with seed 1 (before issue 19's order): hence up to two seeds.
DEMO_RESNET20_VAL_ERR = 6.67
DEMO_RECIPE = ["scaling.num_workers=1", "optim.batch_size=32", "schedule.epochs=6", "schedule.milestones=[5]"]

SKIMAGE_PHOTOS = (  # real photographs bundled with scikit-image (no download): each one a class
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
)
IMAGENET_CLASSES = 1000  # the ImageNet nets keep their 1,000-way head, whatever the photos' classes


@dataclass(frozen=True)
class Sizes:
    """What the parts run: the GPU sizes, or tiny ones for --cpu (the same code paths)."""

    imagenet_nets: tuple = ("resnet18", "resnet50", "resnet152")
    cifar_nets: tuple = ("resnet20", "resnet110")
    compile_nets: tuple = ("resnet18", "resnet50", "resnet152")
    compile_backend: str = "inductor"
    px: int = 224
    batch: int = 256
    cifar_batch: int = 128
    warmup: int = 3  # untimed steps (cuDNN autotuning, allocator, compile)
    steps: int = 8  # timed steps per window; the median of `windows` windows is reported
    windows: int = 3
    matmul_n: int = 8192
    photo: tuple = (500, 375)  # (W, H) of the test photos; train photos vary around it
    train_images: int = 8192  # 32 batches: 14 loader processes make 2 rounds of them in one epoch
    val_images: int = 256
    test_images: int = 64
    shard_size: int = 64  # 128 train shards: shard mode for 2, 8 and 14 loader processes alike
    loader_procs: tuple = (2, 8, 14)
    loader_batches: int = 24
    loader_seconds: float = 6.0  # a timed window ends after this many seconds, whatever loader_batches says
    e2e_procs: int = 2  # BENCHMARKS' goal: 2 CPU cores per GPU feed it
    e2e_steps: int = 20
    eval_batch: int = 32
    eval_ms_batch: int = 8  # multi-scale: 5 scales x 2 flips of the whole image per sample
    eval_procs: int = 8  # imagenet_v1.yaml's data.num_workers
    converge_overrides: tuple = ()
    converge_seeds: tuple = (0, 1)  # a second run only when the first misses the target
    converge_target: float = DEMO_RESNET20_VAL_ERR
    converge_target_is: str = "the CPU demo's"
    budget: float = 465.0  # seconds for the whole check (the issue: at most 8 minutes)
    limits: dict = field(default_factory=lambda: {
        "data": 90, "model": 120, "loader": 120, "e2e": 60, "eval": 90, "converge": 90, "ddp": 45, "compile": 330,
    })


GPU = Sizes()
CPU = Sizes(
    compile_nets=("resnet18",),
    compile_backend="aot_eager",  # Dynamo + AOTAutograd, no code generation (inductor needs minutes on 2 cores)
    px=16,
    batch=4,
    cifar_batch=8,
    warmup=1,
    steps=2,
    windows=1,
    matmul_n=512,
    photo=(100, 75),
    train_images=64,
    val_images=16,
    test_images=8,
    shard_size=8,
    loader_procs=(1, 2),
    loader_batches=3,
    loader_seconds=2.0,
    e2e_procs=1,
    e2e_steps=3,
    eval_batch=8,
    eval_ms_batch=4,
    eval_procs=1,
    # Two epochs, /10 after the first: a short run that still has to learn (chance is 90 % error).
    converge_overrides=("schedule.epochs=2", "schedule.milestones=[1]"),
    converge_seeds=(0,),
    converge_target=50.0,
    converge_target_is="learnt: chance is 90 %",
    # Under a minute on a quiet 2-core machine; the limits are there to catch hangs, and a shared
    # machine under load runs it several times slower.
    budget=600.0,
    limits={"data": 60, "model": 120, "loader": 90, "e2e": 90, "eval": 90, "converge": 180, "ddp": 60, "compile": 120},
)


# =============================================================================================
# The child: runs parts in order, one JSON event per line into the events file.


class PartFailed(RuntimeError):
    """A part that ran but did not do what it must (e.g. did not learn), or ran out of time."""


class Part:
    """One part's context: sizes, device, folders, its deadline, and how it reports a number."""

    def __init__(self, name: str, sizes: Sizes, device, work: Path, events: Path, deadline: float):
        self.name, self.sizes, self.device, self.work, self.events = name, sizes, device, work, events
        self.deadline = deadline
        self.cuda = device.type == "cuda"
        self.results: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise PartFailed(f"time limit: {self.left():.0f} s left, {what} needs about {seconds:.0f} s")

    def say(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)

    def result(self, name: str, line: str, **numbers) -> None:
        self.say(line)
        self.results.append({"name": name, **numbers})
        emit(self.events, "result", self.name, name=name, line=f"[{self.name}] {line}", **numbers)

    def earlier(self, part: str, name: str) -> dict | None:
        """A result of an earlier part (also from an earlier child process)."""
        found = None
        for event in read_events(self.events):
            if event["event"] == "result" and event["part"] == part and event["name"] == name:
                found = event
        return found

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)


def emit(events: Path, event: str, part: str | None, **fields) -> None:
    with events.open("a") as f:
        f.write(json.dumps({"event": event, "part": part, "time": time.time(), **fields}, default=str) + "\n")


def read_events(events: Path) -> list[dict]:
    if not events.exists():
        return []
    return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]


def finite(x: float, what: str) -> float:
    if not math.isfinite(x) or x <= 0:
        raise PartFailed(f"{what} is {x!r}")
    return x


# ---------------------------------------------------------------------------------------------
# Configs: the project's files with the check's overrides.


def imagenet_cfg(part: Part, name: str, *overrides: str):
    from orchestrator.config import load_train_config

    s = part.sizes
    return load_train_config("imagenet_v1.yaml", [
        f"model.name={name}", f"data.url={part.work / 'photos-shards'}", f"data.size={s.px}", "data.scale_range=[]",
        f"optim.batch_size={s.batch}", "scaling.num_workers=1", f"scaling.use_gpu={str(part.cuda).lower()}", *overrides,
    ])


def cifar_cfg(part: Part, name: str, *overrides: str):
    from orchestrator.config import load_train_config

    return load_train_config("cifar10_resnet.yaml", [
        f"model.name={name}", f"data.url={part.work / 'digits'}", f"optim.batch_size={part.sizes.cifar_batch}",
        "scaling.num_workers=1", f"scaling.use_gpu={str(part.cuda).lower()}", *overrides,
    ])


# ---------------------------------------------------------------------------------------------
# data


def photographs() -> list[tuple[str, object]]:
    """(name, HxWx3 uint8) of the real photographs the installed libraries ship: scikit-image's where it
    is installed (the GPU machine has it), and always scikit-learn's two (a project dependency)."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = []
    try:
        import skimage.data
    except ImportError:
        skimage = None
    for name in SKIMAGE_PHOTOS if skimage else ():
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a sample this version would have to download: there is no network there
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append((name, np.ascontiguousarray(image[..., :3])))
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images, strict=True):
        photos.append((Path(path).stem, image))
    return photos


def cut_photo(photos, index: int, size: tuple[int, int], vary: bool, seed: int):
    """One ImageNet-like picture: a random crop (35-100 % of the area, the target's aspect) of photo
    `index % len(photos)`, resized to about `size` (W, H), sometimes portrait and flipped when `vary`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    label = index % len(photos)
    pixels = photos[label][1]
    w, h = size
    if vary:
        h = int(round(w * rng.uniform(0.66, 0.8)))  # 500 x 330..400, as ImageNet's landscape photos
        if rng.random() < 0.25:
            w, h = h, w
    ph, pw = pixels.shape[:2]
    area = rng.uniform(0.35, 1.0) * ph * pw
    ch = min(ph, int(round(math.sqrt(area * h / w))))
    cw = min(pw, int(round(ch * w / h)))
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    image = Image.fromarray(pixels[top : top + ch, left : left + cw]).resize((w, h), Image.Resampling.BILINEAR)
    if vary and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return label, image


def part_data(part: Part) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.shards import main as shards_cli

    s = part.sizes
    t0 = time.perf_counter()
    photos = photographs()
    src = part.work / "photos"
    counts = {"train": s.train_images, "val": s.val_images, "test": s.test_images}

    def write(split: str, index: int) -> int:
        label, image = cut_photo(photos, index, s.photo, vary=split == "train", seed=list(counts).index(split))
        folder = src / split / f"{label:02d}-{photos[label][0]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:06d}.jpg"
        image.save(path, format="JPEG", quality=90)
        return path.stat().st_size

    # Pillow's resize and JPEG encoder release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        nbytes = sum(pool.map(lambda job: write(*job), [(sp, i) for sp, n in counts.items() for i in range(n)]))
    made = time.perf_counter() - t0
    shards = part.work / "photos-shards"
    rc = shards_cli(["write", "--source", f"imagefolder:{src}", "--out", str(shards), "--shard-size", str(s.shard_size),
                     "--stats-limit", "256", "--quiet"])
    if rc != 0:
        raise PartFailed(f"pipelines.shards write --source imagefolder:{src} exited {rc}")
    total = sum(counts.values())
    part.result(
        "photos", f"{total} JPEGs ({len(photos)} photographs as classes; {s.photo[0]}x{s.photo[1]} px, quality 90, "
        f"{nbytes / total / 1024:.0f} KiB each) in {made:.1f} s; shards in {time.perf_counter() - t0 - made:.1f} s",
        photos=len(photos), images=total, **counts, kib_per_image=nbytes / total / 1024, seconds=time.perf_counter() - t0,
    )
    t1 = time.perf_counter()
    rc = shards_cli(["write", "--source", "digits", "--out", str(part.work / "digits"), "--quiet"])
    if rc != 0:
        raise PartFailed(f"pipelines.shards write --source digits exited {rc}")
    part.result("digits", f"digits shards (scikit-learn's 1,797 8x8 digits at 32x32) in {time.perf_counter() - t1:.1f} s",
                seconds=time.perf_counter() - t1)


# ---------------------------------------------------------------------------------------------
# model (and compile): training steps on synthetic tensors


def matmul_peak(part: Part) -> float:
    """TFLOP/s of a large bf16 matrix product on random data (fp32 on the CPU): the MFU denominator."""
    import torch

    n = part.sizes.matmul_n
    dtype = torch.bfloat16 if part.cuda else torch.float32
    a = torch.randn(n, n, device=part.device, dtype=dtype)
    b = torch.randn(n, n, device=part.device, dtype=dtype)
    for _ in range(3):
        a @ b
    part.sync()
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        part.sync()
        rates.append(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return statistics.median(rates)


class Stepper:
    """The worker's training step (orchestrator.step) for one config, on synthetic or loader batches."""

    def __init__(self, part: Part, cfg, num_classes: int, compile_backend: str | None = None):
        import torch

        from orchestrator.config import derived
        from orchestrator.step import StepOptions, build_model, make_optimizer

        self.part, self.cfg = part, cfg
        self.d = derived(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, num_classes, part.device, 1)
        self.opt = make_optimizer(self.model, cfg, self.d["lr_scaled"], part.device)
        self.net = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        self.options = StepOptions.of(cfg, part.device, 1)
        self.it = 0
        self.loss = None

    def __call__(self, images, labels) -> None:
        from orchestrator.step import lr_at, to_device, train_step

        lr = lr_at(self.cfg, self.d["lr_scaled"], self.it, 1000, 1.0)
        self.loss, _ = train_step(self.net, self.opt, *to_device(images, labels, self.options), lr, self.options)
        self.it += 1

    def synthetic(self, num_classes: int):
        import torch

        b, px = self.d["per_worker_batch"], self.cfg.data.size
        g = torch.Generator(device=self.part.device).manual_seed(1)
        x = torch.randn(b, 3, px, px, device=self.part.device, generator=g)
        y = torch.randint(0, num_classes, (b,), device=self.part.device, generator=g)
        return x, y

    def rate(self, batches, warmup: int, steps: int, windows: int) -> tuple[float, float]:
        """(median img/s over `windows` windows of `steps` steps after `warmup`, seconds of the first step)."""
        t0 = time.perf_counter()
        self(*next(batches))
        self.part.sync()
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            self(*next(batches))
        rates = []
        for _ in range(windows):
            self.part.sync()
            t0, seen = time.perf_counter(), 0
            for _ in range(steps):
                images, labels = next(batches)
                self(images, labels)
                seen += len(labels)
            self.part.sync()
            rates.append(seen / (time.perf_counter() - t0))
        return statistics.median(rates), first


def repeat(batch):
    while True:
        yield batch


def train_flops_per_image(cfg, num_classes: int) -> float:
    """FLOPs of one training step per image: forward + backward ~ 3 x forward; a multiply-add is 2 FLOPs."""
    import models

    net = models.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.overrides)
    return 3 * 2 * models.count_flops(net, (3, cfg.data.size, cfg.data.size))


def measure_net(part: Part, cfg, num_classes: int, peak: float, compile_backend: str | None = None) -> dict:
    import torch

    s = part.sizes
    step = Stepper(part, cfg, num_classes, compile_backend)
    img_s, first = step.rate(repeat(step.synthetic(num_classes)), s.warmup, s.steps, s.windows)
    fpi = train_flops_per_image(cfg, num_classes)
    tflops = fpi * img_s / 1e12
    precision = "bf16" if step.options.bf16 else "fp32"
    layout = "channels_last" if step.options.channels_last else "NCHW"
    kind = f"compiled ({compile_backend})" if compile_backend else "eager"
    loss = float(step.loss) / step.d["per_worker_batch"]  # the last step's mean loss: bf16 must still give a number
    out = dict(net=cfg.model.name, px=cfg.data.size, batch=step.d["per_worker_batch"], precision=precision, layout=layout,
               compiled=bool(compile_backend), img_s=img_s, tflops=tflops, mfu=tflops / peak, gmacs=fpi / 6e9,
               first_step_s=first, loss=loss)
    line = (f"{cfg.model.name:<9} {cfg.data.size:>3} px  batch {out['batch']:<3}  {precision} {layout:<13} {kind:<10} "
            f"{img_s:9.1f} img/s  {tflops:7.2f} TFLOP/s  MFU {100 * out['mfu']:5.1f} %  (first step {first:.1f} s)"
            + ("" if math.isfinite(loss) else f"  LOSS {loss}"))
    del step
    if part.cuda:
        torch.cuda.empty_cache()
    return {"line": line, **out}


def part_model(part: Part) -> None:
    import torch

    s = part.sizes
    peak = finite(matmul_peak(part), "the matmul peak")
    dtype = "bf16" if part.cuda else "fp32"
    part.result("matmul_peak", f"{dtype} matmul {s.matmul_n}^3 on random data: {peak:.3g} TFLOP/s (the MFU denominator)",
                tflops=peak, dtype=dtype, n=s.matmul_n)
    if part.cuda:
        torch.backends.cudnn.benchmark = True  # as the worker sets it
    for name, cfg, classes in [*((n, imagenet_cfg(part, n), IMAGENET_CLASSES) for n in s.imagenet_nets),
                               *((n, cifar_cfg(part, n), 10) for n in s.cifar_nets)]:
        r = measure_net(part, cfg, classes, peak)
        part.result(name, r.pop("line"), **r)
    diverged = [r["name"] for r in part.results if "loss" in r and not math.isfinite(r["loss"])]
    if diverged:  # after every net has its numbers
        raise PartFailed(f"the training loss is not finite for {diverged}")


def part_compile(part: Part) -> None:
    import torch

    s = part.sizes
    peak_event = part.earlier("model", "matmul_peak")
    peak = peak_event["tflops"] if peak_event else finite(matmul_peak(part), "the matmul peak")
    if part.cuda:
        torch.backends.cudnn.benchmark = True
    for name in s.compile_nets:
        part.need(20, f"compiling {name}")
        torch.compiler.reset()  # each net compiles from scratch, and its compile time is its own
        r = measure_net(part, imagenet_cfg(part, name), IMAGENET_CLASSES, peak, s.compile_backend)
        eager = part.earlier("model", name)
        r["vs_eager"] = r["img_s"] / eager["img_s"] if eager else None
        line = r.pop("line") + (f"  {r['vs_eager']:.2f}x eager" if eager else "")
        part.result(name, line, compile_s=r["first_step_s"], **r)
    diverged = [r["name"] for r in part.results if "loss" in r and not math.isfinite(r["loss"])]
    if diverged:
        raise PartFailed(f"the training loss is not finite for {diverged}")


# ---------------------------------------------------------------------------------------------
# loader and e2e


def train_batches(cfg, manifest: dict, device):
    """Rank 0's training batches, epoch after epoch, made as the worker makes them: encoded bytes decoded
    by the batch transform on the device (decode_on=gpu), or decoded and augmented in the loader processes."""
    import torch

    import pipelines
    from orchestrator.config import derived
    from orchestrator.step import Transformed, make_batch_transforms, make_transforms

    gpu_decode = cfg.data.decode_on == "gpu"
    rng = torch.Generator()
    batch_tf = make_batch_transforms(cfg, manifest, device, rng)[0] if gpu_decode else None
    tf = None if gpu_decode else make_transforms(cfg, manifest)[0]
    epoch = 0
    while True:
        loader = pipelines.make_loader(
            cfg.data.url, cfg.data.train_split, derived(cfg)["per_worker_batch"], epoch=epoch, transform=tf, shuffle=True,
            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda", decode=not gpu_decode,
        )
        if gpu_decode:
            rng.manual_seed(epoch)
            loader = Transformed(loader, batch_tf)
        yield from loader
        epoch += 1


def part_loader(part: Part) -> None:
    import pipelines

    s = part.sizes
    failures = []
    for decode_on in ("gpu", "cpu"):
        for procs in s.loader_procs:
            what = f"decode_on={decode_on} x{procs}"
            try:
                part.need(5, what)
                cfg = imagenet_cfg(part, "resnet50", f"data.decode_on={decode_on}", f"data.num_workers={procs}")
                manifest = pipelines.read_manifest(cfg.data.url)
                # Steady state: the first round of batches (one per process, made while they all start at
                # once) is warm-up; the timed ones come after it, within the same epoch (a new epoch starts
                # new processes).
                warmup = max(2, procs)
                timed = min(s.loader_batches, manifest["splits"]["train"]["num_samples"] // s.batch - warmup)
                with contextlib.closing(train_batches(cfg, manifest, part.device)) as batches:  # closing stops its processes
                    t0 = time.perf_counter()
                    next(batches)
                    first = time.perf_counter() - t0
                    for _ in range(warmup - 1):
                        next(batches)
                    part.sync()
                    t0, seen, n = time.perf_counter(), 0, 0
                    while n < timed and time.perf_counter() - t0 < s.loader_seconds:
                        images, labels = next(batches)
                        images = images.to(part.device, non_blocking=True)  # a no-op when decoded on the device
                        seen, n = seen + len(labels), n + 1
                    part.sync()
                    img_s = finite(seen / (time.perf_counter() - t0), what)
                part.result(f"{decode_on}-{procs}", f"decode_on={decode_on:<3}  {procs:2d} loader processes  {img_s:8.1f} img/s at "
                            f"{s.px} px  ({n} batches of {len(labels)} after {warmup} warm-up; first batch after {first:.1f} s)",
                            decode_on=decode_on, procs=procs, img_s=img_s, images=seen, first_batch_s=first)
            except Exception as err:  # the other configurations still run; the part fails at the end
                failures.append(f"{what}: {type(err).__name__}: {err}")
                part.say(f"{what} FAILED: {type(err).__name__}: {err}")
    if failures:
        raise PartFailed("; ".join(failures))


def part_e2e(part: Part) -> None:
    import torch

    import pipelines

    s = part.sizes
    if part.cuda:
        torch.backends.cudnn.benchmark = True
    cfg = imagenet_cfg(part, "resnet50", "data.decode_on=gpu", f"data.num_workers={s.e2e_procs}")
    step = Stepper(part, cfg, IMAGENET_CLASSES)
    model_only, _ = step.rate(repeat(step.synthetic(IMAGENET_CLASSES)), s.warmup, s.e2e_steps, 1)
    with contextlib.closing(train_batches(cfg, pipelines.read_manifest(cfg.data.url), part.device)) as batches:
        fed, _ = step.rate(batches, s.warmup, s.e2e_steps, 1)
    ratio = fed / model_only
    part.result("resnet50", f"resnet50 fed by the loader (decode_on=gpu, {s.e2e_procs} loader processes) {fed:8.1f} img/s; "
                f"the same step on synthetic tensors {model_only:8.1f} img/s; ratio {ratio:.3f}",
                end_to_end_img_s=fed, model_only_img_s=model_only, ratio=ratio, procs=s.e2e_procs, decode_on="gpu")


# ---------------------------------------------------------------------------------------------
# eval


def part_eval(part: Part) -> None:
    import torch

    import pipelines
    from orchestrator.step import build_model, evaluate, make_transforms

    s = part.sizes
    if part.cuda:
        torch.backends.cudnn.benchmark = True
    cfg = imagenet_cfg(part, "resnet50")
    manifest = pipelines.read_manifest(cfg.data.url)
    torch.manual_seed(0)
    model = build_model(cfg, IMAGENET_CLASSES, part.device, 1)
    for protocol, split, batch, views in (("ten_crop", "val", s.eval_batch, "10 views"),
                                          ("multi_scale", "test", s.eval_ms_batch, "5 scales x 2 flips")):
        part.need(5, protocol)
        test_tf = make_transforms(cfg, manifest, protocol=protocol)[1]
        loader = pipelines.make_loader(cfg.data.url, split, batch, transform=test_tf, shuffle=False,
                                       num_workers=s.eval_procs, pin_memory=part.cuda)
        evaluate(model, loader, part.device)  # warm: loader start-up, cuDNN autotuning of each shape
        part.sync()
        t0 = time.perf_counter()
        metrics = evaluate(model, loader, part.device)
        part.sync()
        img_s = finite(metrics["n"] / (time.perf_counter() - t0), protocol)
        part.result(protocol, f"evaluate() {protocol:<11} ({views}, batch {batch}, {s.eval_procs} loader processes): "
                    f"{img_s:8.1f} img/s over {metrics['n']} images", img_s=img_s, n=metrics["n"], batch=batch,
                    procs=s.eval_procs, top1_err=metrics["top1_err"])


# ---------------------------------------------------------------------------------------------
# converge


def train_recipe(part: Part, seed: int, t_start: float) -> dict:
    """The demo's recipe, once, as the worker runs it (minus Ray): per epoch a fresh loader, the step of
    orchestrator.step, and evaluate() on the validation split."""
    import torch

    import pipelines
    from orchestrator.config import derived, load_train_config
    from orchestrator.step import (
        StepOptions,
        build_model,
        evaluate,
        lr_at,
        make_optimizer,
        make_transforms,
        to_device,
        train_step,
    )

    s = part.sizes
    cfg = load_train_config("digits_resnet20.yaml", [
        f"data.url={part.work / 'digits'}", *DEMO_RECIPE, f"scaling.use_gpu={str(part.cuda).lower()}", f"seed={seed}",
        *s.converge_overrides,
    ])
    d = derived(cfg)
    t0 = time.perf_counter()
    manifest = pipelines.read_manifest(cfg.data.url)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(manifest["classes"]), part.device, 1)
    opt = make_optimizer(model, cfg, d["lr_scaled"], part.device)
    options = StepOptions.of(cfg, part.device, 1)
    train_tf, test_tf = make_transforms(cfg, manifest)
    common = dict(num_workers=cfg.data.num_workers, seed=cfg.seed, pin_memory=part.cuda)
    val_loader = pipelines.make_loader(cfg.data.url, cfg.data.val_split, d["per_worker_batch"], transform=test_tf,
                                       shuffle=False, **common)
    step, reached, val = 0, None, None
    for epoch in range(cfg.schedule.epochs):
        loader = pipelines.make_loader(cfg.data.url, cfg.data.train_split, d["per_worker_batch"], epoch=epoch,
                                       transform=train_tf, shuffle=True, shuffle_buffer=cfg.data.shuffle_buffer, **common)
        model.train()
        for images, labels in loader:
            lr = lr_at(cfg, d["lr_scaled"], step, len(loader), 1.0)
            loss, _ = train_step(model, opt, *to_device(images, labels, options), lr, options)
            step += 1
        val = evaluate(model, val_loader, part.device)
        if reached is None and val["top1_err"] <= s.converge_target:
            reached = (epoch + 1, time.perf_counter() - t_start)
        part.say(f"seed {seed} epoch {epoch + 1}/{cfg.schedule.epochs}  loss {float(loss) / len(labels):.3f}  "
                 f"val err {val['top1_err']:.2f} %  lr {lr:.3g}  {time.perf_counter() - t0:.1f} s")
    return dict(seed=seed, val_err=val["top1_err"], n=val["n"], steps=step, seconds=time.perf_counter() - t0,
                epochs=cfg.schedule.epochs, batch=d["per_worker_batch"], precision="bf16" if options.bf16 else "fp32",
                reached=reached)


def part_converge(part: Part) -> None:
    """The recipe until its final validation error is at most the target, for at most two seeds: the
    recipe's own spread is wide (on the CPU, seed 0 ends at 4.44 %, seed 1 at 8.52 %); a broken path
    (bf16, channels_last, fused SGD) misses with both."""
    import torch

    s = part.sizes
    if part.cuda:
        torch.backends.cudnn.benchmark = True
    t_start, runs = time.perf_counter(), []
    for seed in s.converge_seeds:
        part.need(10, f"the recipe with seed {seed}")
        runs.append(train_recipe(part, seed, t_start))
        if runs[-1]["val_err"] <= s.converge_target:
            break
    done = next((r for r in runs if r["val_err"] <= s.converge_target), None)
    best = min(runs, key=lambda r: r["val_err"])
    first = runs[0]
    part.result(
        "resnet20",
        f"resnet20 on digits ({first['precision']}, {first['epochs']} epochs, batch {first['batch']}): final val err "
        + ", ".join(f"{r['val_err']:.2f} % (seed {r['seed']}, {r['seconds']:.1f} s)" for r in runs)
        + f"; target <= {s.converge_target:.2f} % ({s.converge_target_is}): "
        + (f"reached in {time.perf_counter() - t_start:.1f} s" if done else "NOT reached"),
        net="resnet20", val_err=best["val_err"], target_err=s.converge_target, target_is=s.converge_target_is,
        runs=[{k: v for k, v in r.items() if k != "reached"} for r in runs], seeds_tried=len(runs), n=first["n"],
        seconds_to_target=time.perf_counter() - t_start if done else None, seconds=time.perf_counter() - t_start,
        precision=first["precision"], epochs=first["epochs"],
    )
    if not done:
        raise PartFailed(f"resnet20 ended at val err {best['val_err']:.2f} % at best, above {s.converge_target:.2f} % "
                         f"({s.converge_target_is})")


# ---------------------------------------------------------------------------------------------
# ddp


def part_ddp(part: Part) -> None:
    import socket

    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.config import derived
    from orchestrator.step import StepOptions, build_model, make_optimizer, to_device, train_step

    backend = "nccl" if part.cuda else "gloo"
    # One rank on one machine: NCCL's bootstrap needs no network, and a machine with none but loopback
    # would otherwise find no interface to use.
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if part.cuda:
        torch.cuda.set_device(part.device)
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = cifar_cfg(part, "resnet20")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, 10, part.device, 1)
        ddp = DistributedDataParallel(model, device_ids=[part.device.index] if part.cuda else None)
        reduced: list[int] = []

        def counting_allreduce(state, bucket):  # DDP's own all-reduce, counted
            reduced.append(bucket.buffer().numel())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        options = StepOptions.of(cfg, part.device, 1)
        opt = make_optimizer(model, cfg, derived(cfg)["lr_scaled"], part.device)
        x = torch.randn(cfg.optim.batch_size, 3, 32, 32)
        y = torch.randint(0, 10, (cfg.optim.batch_size,))
        before = [p.detach().clone() for p in model.parameters()]
        loss, _ = train_step(ddp, opt, *to_device(x, y, options), 0.1, options)
        part.sync()
        finite(float(loss), "the DDP step's loss")
        moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True))
        t = torch.full((1024,), 3.0, device=part.device)
        dist.all_reduce(t)
        part.sync()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if dist.get_backend() != backend or sum(reduced) != params or not bool((t == 3.0).all()) or moved == 0:
            raise PartFailed(f"backend {dist.get_backend()}, {sum(reduced)} of {params} gradient values all-reduced, "
                             f"all_reduce gave {t[0].item()}, {moved} parameter tensors moved")
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if part.cuda else None
        part.result("ddp", f"backend {dist.get_backend()}" + (f" (NCCL {nccl})" if nccl else "")
                    + f", world size {dist.get_world_size()}: one DDP step all-reduced {len(reduced)} bucket(s), "
                    f"{sum(reduced)} gradient values (all {params}); all_reduce of 1024 values correct; "
                    f"{time.perf_counter() - t0:.1f} s", backend=dist.get_backend(), world_size=dist.get_world_size(),
                    buckets=len(reduced), values=sum(reduced), params=params, allreduce_ok=True, nccl=nccl)
    finally:
        dist.destroy_process_group()


PART_FUNCTIONS = {
    "data": part_data, "model": part_model, "loader": part_loader, "e2e": part_e2e, "eval": part_eval,
    "converge": part_converge, "ddp": part_ddp, "compile": part_compile,
}


def environment(device) -> dict:
    import numpy
    import torch
    import torchvision

    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": numpy.__version__, "cpus": os.cpu_count(), "device": str(device),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    with contextlib.suppress(OSError):
        env["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    for dist_name, module in MAY_TRAVEL.items():  # where the carried packages came from
        if module in sys.modules:
            env[f"from.{dist_name}"] = str(Path(sys.modules[module].__file__).parent)
    return env


def child_main(args) -> int:
    """Run `args.parts` in order; stop at the first that fails (a CUDA error can poison the process),
    so the parent goes on in a fresh one."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent, however it ends
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    sys.path.insert(0, str(ROOT))
    import torch

    import models  # noqa: F401  (the imports the parts need, once, before the first part's clock starts)
    import orchestrator.step  # noqa: F401
    import pipelines  # noqa: F401

    leaked = [m for m in NEVER_THERE if m in sys.modules]
    sizes = CPU if args.cpu else GPU
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if args.cpu:
        # One thread, as Ray gives its workers: on a shared machine under load, OpenMP threads that wait
        # for each other at every barrier made steps 10-50x slower (a ResNet-110 step: 6 s vs 0.4 s).
        torch.set_num_threads(1)
    events, work = Path(args.events), Path(args.work)
    limits, drills = {**sizes.limits, **args.limit}, args.drill
    emit(events, "env", None, env=environment(device))
    for name in args.parts.split(","):
        deadline = min(time.time() + limits[name], args.deadline)
        emit(events, "start", name, limit_s=round(deadline - time.time(), 1))
        t0 = time.perf_counter()
        try:
            if leaked:
                raise PartFailed(f"the project's import path pulled in {leaked}, which the GPU machine lacks")
            if drills.get(name) == "crash":  # fault drills (the tests): the process dies, or the part hangs
                os._exit(9)
            if drills.get(name) == "hang":
                time.sleep(24 * 3600)
            PART_FUNCTIONS[name](Part(name, sizes, device, work, events, deadline))
        except Exception as err:
            traceback.print_exc()
            print(f"[{name}] FAILED: {type(err).__name__}: {err}", flush=True)
            emit(events, "end", name, ok=False, seconds=time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
            return 3
        emit(events, "end", name, ok=True, seconds=time.perf_counter() - t0)
    return 0


# =============================================================================================
# The parent: starts children, enforces the limits, writes the JSON.


def goals(report: dict) -> list[dict]:
    """The issue's goals that this run speaks to; informational (the exit code counts failed parts only).
    `met` is None where the goal does not apply: speed goals on the CPU, the img/s floors off Hopper."""
    results = {(p, r["name"]): r for p, part in report["parts"].items() for r in part.get("results", [])}
    on_gpu = report["mode"] == "gpu"
    hopper = on_gpu and any(k in report.get("env", {}).get("gpu", "") for k in ("H100", "H200"))
    out = []
    for net, floor in (("resnet50", 3000), ("resnet18", 9000)):
        r = results.get(("model", net))
        if r:
            met = r["img_s"] >= floor if hopper else None
            out.append({"goal": f"{net} bf16 model only >= {floor} img/s on an H100/H200-class GPU", "value": r["img_s"], "met": met})
    r = results.get(("e2e", "resnet50"))
    if r:
        met = r["ratio"] >= 0.90 if on_gpu else None
        out.append({"goal": "end to end with GPU decoding >= 0.90 of model only", "value": r["ratio"], "met": met})
    for (p, net), r in results.items():
        if p == "compile" and r.get("vs_eager") is not None:
            met = r["vs_eager"] >= 1.0 if on_gpu else None
            out.append({"goal": f"{net}: torch.compile not slower than eager", "value": r["vs_eager"], "met": met})
    r = results.get(("converge", "resnet20"))
    if r:
        out.append({"goal": f"resnet20 digits val err <= {r['target_err']:.2f} % ({r['target_is']})", "value": r["val_err"],
                    "met": r["val_err"] <= r["target_err"]})
    return out


def write_report(report: dict, out: Path) -> None:
    report["goals"] = goals(report)
    report["ok"] = all(report["parts"].get(p, {}).get("ok") for p in report["selected"])
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, out / "gpu_check.json")


def run_parts(args, sizes: Sizes, out: Path, work: Path) -> dict:
    parts = [p for p in PARTS if p in args.parts]
    started = time.time()
    deadline = started + (args.budget or sizes.budget)
    report = {
        "check": "benchmarks/gpu_check.py", "mode": "cpu" if args.cpu else "gpu", "command": " ".join(sys.argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "budget_s": deadline - started,
        "sizes": asdict(sizes), "selected": parts, "env": {}, "parts": {},
    }
    pending = list(parts)
    events = Events(work / "events.jsonl")

    def fail(names: list[str], why: str) -> None:
        for name in names:
            report["parts"][name] = {"ok": False, "seconds": 0, "error": why, "results": []}
            print(f"[{name}] FAILED: {why}", flush=True)

    try:
        while pending:
            if time.time() > deadline - 2:
                fail(pending, "not run: the check's time budget was spent")
                break
            if not run_child(args, report, pending, events, work, deadline, out):
                break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into this): the children are gone already
        fail([p for p in pending if p not in report["parts"] or report["parts"][p]["ok"] is None], "interrupted")
    report["seconds"] = round(time.time() - started, 1)
    write_report(report, out)
    return report


class Events:
    """The child's events file, read as it grows."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[dict]:
        text = self.path.read_text()[self.offset :] if self.path.exists() else ""
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


def run_child(args, report: dict, pending: list[str], events: Events, work: Path, deadline: float, out: Path) -> bool:
    """One child process for the `pending` parts, watched: a part over its limit is killed with all its
    processes, a process that dies fails its part. False when no child could do better (it never started)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--parts", ",".join(pending), "--events", str(events.path),
           "--work", str(work), "--deadline", repr(deadline)] + (["--cpu"] if args.cpu else [])
    cmd += [f"--limit={k}={v}" for k, v in args.limit.items()] + [f"--drill={k}={v}" for k, v in args.drill.items()]
    # Its own process group, so that a kill takes its loader and compile processes too. Its stderr passes
    # through, and its last lines go into the report when it dies.
    child = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        stderr_tail: collections.deque = collections.deque(maxlen=8)
        forward = threading.Thread(target=forward_lines, args=(child.stderr, stderr_tail), daemon=True)
        forward.start()
        current, part_start, limit, killed, ran = None, 0.0, 0.0, None, 0
        while True:
            done = child.poll() is not None
            for e in events.new():
                if e["event"] == "env":
                    report["env"] = report["env"] or e["env"]
                elif e["event"] == "start":
                    current, part_start, limit, ran = e["part"], time.time(), e["limit_s"], ran + 1
                    report["parts"][current] = {"ok": None, "seconds": None, "limit_s": limit, "error": None, "results": []}
                elif e["event"] == "result":
                    report["parts"][e["part"]]["results"].append({k: v for k, v in e.items() if k not in ("event", "part", "time")})
                elif e["event"] == "end":
                    report["parts"][e["part"]].update(ok=e["ok"], seconds=round(e["seconds"], 1), error=e.get("error"))
                    pending.remove(e["part"])
                    current = None
                    write_report(report, out)
            if done:
                break
            if current and time.time() - part_start > limit + min(10.0, 1.0 + limit / 10):  # its own checks come first
                killed = f"killed after {time.time() - part_start:.0f} s: over its {limit:.0f} s limit"
                break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # nothing of a child outlives it (loader or compile processes)
        child.wait()
    forward.join(timeout=5)
    last = " | ".join(line.strip() for line in stderr_tail if line.strip())[-600:]
    if current:  # it never reported its end: over its limit, or the process died
        why = killed or f"the process died (exit code {child.returncode}): {last}"
        report["parts"][current].update(ok=False, seconds=round(time.time() - part_start, 1), error=why)
        print(f"[{current}] FAILED: {why}", flush=True)
        pending.remove(current)
        write_report(report, out)
    elif ran == 0 and pending:  # it died before its first part (an import error): no child would do better
        why = f"the check could not start (exit code {child.returncode}): {last}"
        for name in pending:
            report["parts"][name] = {"ok": False, "seconds": 0, "error": why, "results": []}
            print(f"[{name}] FAILED: {why}", flush=True)
        return False
    return True


def forward_lines(stream, tail) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


def summary(report: dict) -> list[str]:
    env = report["env"]
    where = (f"{env.get('gpu') or env.get('device')}; python {env.get('python')}, torch {env.get('torch')}, "
             f"torchvision {env.get('torchvision')}") if env else "the child process never started"
    lines = ["", f"gpu_check ({report['mode']}): {where}; {report['seconds']:.0f} s"]
    for p in report["selected"]:
        r = report["parts"].get(p, {})
        state = "ok" if r.get("ok") else f"FAILED: {r.get('error')}"
        lines.append(f"  {p:<9} {state}  ({r.get('seconds') or 0:.0f} s of {r.get('limit_s') or 0:.0f} s)")
    for g in report["goals"]:
        na = "n/a (a CPU run)" if report["mode"] == "cpu" else "n/a (not an H100/H200-class GPU)"
        verdict = {True: "met", False: "NOT met", None: na}[g["met"]]
        lines.append(f"  goal: {g['goal']}: {g['value']:.3g} -> {verdict}")
    lines.append("gpu_check: " + ("all parts passed" if report["ok"] else "FAILED"))
    return lines


def carried_wheels() -> list[str]:
    """`name==version` of the packages the GPU machine lacks that the check's import path needs."""
    from importlib.metadata import version

    sys.path.insert(0, str(ROOT))
    import importlib

    import models  # noqa: F401
    import orchestrator.config  # noqa: F401
    import orchestrator.step  # noqa: F401
    import pipelines

    for module in pipelines.MODULES:  # `import pipelines` imports them on first use (PEP 562): the check uses them all
        importlib.import_module(f"pipelines.{module}")

    leaked = [m for m in NEVER_THERE if m in sys.modules]
    if leaked:
        raise SystemExit(f"error: the check's import path pulls in {leaked}, which cannot travel to the GPU machine")
    return [f"{d}=={version(d)}" for d, m in MAY_TRAVEL.items() if m in sys.modules]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU fallbacks at tiny sizes (the test suite)")
    parser.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.txt (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (data is added when needed)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 465 on GPU, 600 with --cpu)")
    parser.add_argument("--work", default=None, help="scratch folder for the photos and shards (default: a temp folder, removed)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for a part, e.g. compile=400 (repeatable)")
    parser.add_argument("--print-wheels", action="store_true", help="print the wheels that must travel to the GPU machine, and exit")
    parser.add_argument("--drill", action="append", default=[], help=argparse.SUPPRESS)  # PART=crash|hang, for the tests
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.limit = {k: float(v) for k, _, v in (x.partition("=") for x in args.limit)}
    except ValueError:
        parser.error(f"--limit takes PART=SECONDS, got {args.limit}")
    args.drill = dict(x.partition("=")[::2] for x in args.drill)
    if not set(args.limit) | set(args.drill) <= set(PARTS):
        parser.error(f"--limit/--drill name a part of {', '.join(PARTS)}")
    if args.print_wheels:
        print(" ".join(carried_wheels()))
        return 0
    if args.child:
        return child_main(args)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    if args.work is None and "data" not in args.parts:
        args.parts.insert(0, "data")  # a fresh scratch folder has no shards
    if not args.cpu:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            print("error: no CUDA device here (torch.cuda.is_available() is not True); run with --cpu for the CPU fallbacks"
                  + (f"\n{probe.stderr.strip()}" if probe.returncode else ""), file=sys.stderr)
            return 2
    sizes = CPU if args.cpu else GPU
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill from outside stops the children first
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "events.jsonl").unlink(missing_ok=True)
    try:
        report = run_parts(args, sizes, out, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = summary(report)
    print("\n".join(lines), flush=True)
    results = [r["line"] for p in report["selected"] for r in report["parts"].get(p, {}).get("results", [])]
    (out / "gpu_check.txt").write_text("\n".join(results + lines) + "\n")
    print(f"wrote {out / 'gpu_check.json'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
