"""Measure training throughput piece by piece, in one run:

  (1) model only   forward + backward + SGD step on synthetic tensors (after warm-up), with MFU
  (2) loader       read + decode + augment from shards, images/s
  (3) end to end   shards -> model through Ray Train (TorchTrainer), and the same loop under plain
                   PyTorch DDP; ratios end to end / model only (data stall) and Ray Train / plain DDP

The settings are the ImageNet v1 recipe (orchestrator/configs/imagenet_v1.yaml) with the options
below and any key.sub=value overrides; the recipe's fast path applies: bf16 autocast, channels_last,
cuDNN autotuning, fused SGD and pinned memory on GPU, optional torch.compile, and optional JPEG
decoding + augmentation on the GPU (--decode-on gpu). Without --data, synthetic JPEG shards sized to
the input (sides 8/7 to 2 x --size) are written to a temporary folder.

MFU = 3 x 2 x count_flops(model) x img/s over the device's dense peak (H100 SXM / H200 bf16 989,
A100 312 TFLOP/s); on a CPU the peak is unknown unless --peak-tflops is given.

Results: printed, logged to MLflow (experiment "bench": device, versions, command, numbers;
MLFLOW_TRACKING_URI, else ./mlflow.db) and appended to BENCHMARKS.md (--record '' to skip).

examples:
  python -m orchestrator.run bench                                   # CPU: resnet50 at 64 px, ~2 min
  python -m orchestrator.run bench --model resnet18 --size 32 --steps 10
  python -m orchestrator.run bench --size 224 --batch-size 256 --decode-on gpu --loader-workers 2   # one H100
  python -m orchestrator.run bench --data s3://YOUR-BUCKET/imagenet --workers 8 --parts loader,ddp,ray
"""

from __future__ import annotations

import os

PARTS = ("model", "loader", "ddp", "ray")


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="train-config overrides (e.g. model.overrides.stride_in_1x1=false)")
    p.add_argument("--model", default="resnet50", help="a name from models.list_models() (default resnet50)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: 224 on GPU, 64 on CPU)")
    p.add_argument("--data", default=None, help="shards (folder or s3://...); default: synthetic JPEG shards in a temp folder")
    p.add_argument("--images", type=int, default=None, help="synthetic train images (default: enough for the steps, at most 8192)")
    p.add_argument("--workers", type=int, default=1, help="training workers (one GPU each on GPU)")
    p.add_argument("--loader-workers", type=int, default=None, help="loader processes per worker (default: cores per worker - 1, 1..8)")
    p.add_argument("--decode-on", choices=("cpu", "gpu"), default="cpu", help="where JPEGs are decoded and augmented (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on GPU, 2 on CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32/TF32 instead of bf16 autocast (GPU)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW instead of channels_last (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in the warm-up)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU where the table has none")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--record", default="BENCHMARKS.md", help="file to append the entry to (relative: to the project root; '' skips)")
    p.add_argument("--experiment", default="bench", help="MLflow experiment")


def main(args) -> int:
    import tempfile

    import torch

    from .. import bench
    from ..config import ConfigError, load_train_config

    load_start = bench.load_average()
    parts = tuple(x for x in args.parts.split(",") if x)
    if not parts or set(parts) - set(PARTS):
        raise ConfigError(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    from .. import preflight
    from ..cluster import user_path
    from ..tracking import tracking_uri

    if args.data:  # before any work: the shards are readable
        args.data = user_path(args.data, "--data")
        preflight.check_data(args.data, ["train"], "--data")
    preflight.check_tracking(tracking_uri())
    gpu = torch.cuda.is_available() and not args.cpu
    size = args.size or (224 if gpu else 64)
    batch = args.batch_size or (256 if gpu else 16)
    steps, warmup = args.steps or (50 if gpu else 5), args.warmup if args.warmup is not None else (10 if gpu else 2)
    cores = max(1, (os.cpu_count() or 1) // args.workers)
    loader_workers = args.loader_workers if args.loader_workers is not None else min(8, max(1, cores - 1))
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        data = args.data
        if not data:
            images = args.images or min(8192, max(4, warmup + steps) * batch * args.workers)
            print(f"[bench] writing {images} synthetic JPEGs sized to {size} px to {tmp}", flush=True)
            data = bench.synthetic_shards(tmp, size, images)
        cfg = load_train_config("imagenet_v1.yaml", [
            f"model.name={args.model}", f"data.url={data}", f"data.size={size}", "data.scale_range=[]",
            f"data.num_workers={loader_workers}", f"data.decode_on={args.decode_on}",
            f"optim.batch_size={batch * args.workers}", f"scaling.num_workers={args.workers}",
            f"scaling.use_gpu={str(gpu).lower()}", f"scaling.cpus_per_worker={cores}",
            f"scaling.bf16={str(args.bf16).lower()}", f"scaling.channels_last={str(args.channels_last).lower()}",
            f"scaling.compile={str(args.compile).lower()}", *args.overrides,
        ])
        spec = bench.BenchSpec(cfg, steps=steps, warmup=warmup, extra={"synthetic_data": not args.data})
        result = bench.run(spec, peak=args.peak_tflops, parts=parts)
    for line in result.verdicts:
        print(f"goal: {line}")
    command = bench.command_line()
    run_id = bench.log_mlflow(result, command, args.experiment)
    print(f"[bench] MLflow run {run_id} (experiment {args.experiment!r})")
    if args.record:
        path = args.record if os.path.isabs(args.record) else bench.tracking.PROJECT_ROOT / args.record
        where = "GPU" if gpu else "CPU"
        title = f"bench: {cfg.model.name} at {size} px on {where} ({result.params['device']}), decode on {cfg.data.decode_on}"
        load = f"at the start {load_start}; at the end {bench.load_average()}"
        bench.append_entry(path, title, command, "\n".join(result.lines), result.verdicts, machine=result.params["device"], load=load)
        print(f"[bench] appended to {path}")
    return 0
