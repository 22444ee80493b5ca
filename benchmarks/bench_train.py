"""Measure training throughput piece by piece, in one run (the measurements: `throughput.py`):

  (1) model only   forward + backward + SGD step on synthetic tensors (after warm-up), with MFU
  (2) loader       read + decode + augment from shards, images/s
  (3) end to end   shards -> model through Ray Train (TorchTrainer), and the same loop under plain
                   PyTorch DDP; ratios end to end / model only (data stall) and Ray Train / plain DDP

Every step is the product's own (`orchestrator.step.train_step`: autocast, channels_last, the loss
scale and label smoothing, fused SGD on GPU, the learning-rate schedule), on the recipe --recipe
(default: the ImageNet v1 recipe) with the options below and any key.sub=value overrides; optional
torch.compile, and optional JPEG decoding + augmentation on the GPU (--decode-on gpu). Without --data,
synthetic JPEG shards sized to the input (sides 8/7 to 2 x --size) are written to a temporary folder.

MFU = 3 x 2 x count_flops(model) x img/s over the device's dense peak (H100 SXM / H200 bf16 989,
A100 312 TFLOP/s); on a CPU the peak is unknown unless --peak-tflops is given.

Results: printed, logged to MLflow (experiment "bench": device, versions, command, numbers;
MLFLOW_TRACKING_URI, else ./mlflow.db) and appended to the root BENCHMARKS.md (--record '' to skip).
Bad input is one line (`error: ...`) and exit code 2, as for `python -m orchestrator.run`.

examples:
  .venv/bin/python benchmarks/bench_train.py                                 # CPU: resnet50 at 64 px, ~2 min
  .venv/bin/python benchmarks/bench_train.py --model resnet18 --size 32 --steps 10
  .venv/bin/python benchmarks/bench_train.py --size 224 --batch-size 256 --decode-on gpu --loader-workers 2   # one H100
  .venv/bin/python benchmarks/bench_train.py --data s3://YOUR-BUCKET/imagenet --workers 8 --parts loader,ddp,ray
  # Ray Train against plain DDP on the digits (goal: >= 0.95 on CPU, >= 0.97 on one H100):
  .venv/bin/python benchmarks/bench_train.py --recipe digits_resnet20.yaml --source digits --data data/digits \\
      --model resnet20 --size 32 --batch-size 32 --workers 2 --loader-workers 1 --steps 40 --warmup 5 --parts ddp,ray
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import throughput

PARTS = ("model", "loader", "ddp", "ray")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/bench_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="train-config overrides (e.g. model.overrides.stride_in_1x1=false)")
    p.add_argument("--recipe", default="imagenet_v1.yaml", help="the training recipe (orchestrator/configs/recipes/; default imagenet_v1.yaml)")
    p.add_argument("--model", default="resnet50", help="a name from models.list_models() (default resnet50)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: 224 on GPU, 64 on CPU)")
    p.add_argument("--data", default=None, help="shards (folder or s3://...); default: synthetic JPEG shards in a temp folder")
    p.add_argument("--source", default=None, help="write --data from this pipelines source first if it has no shards (e.g. digits)")
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
    p.add_argument("--record", default=str(throughput.BENCHMARKS_MD), help="file to append the entry to ('' skips)")
    p.add_argument("--experiment", default="bench", help="MLflow experiment")
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    from orchestrator.config import ConfigError
    from orchestrator.preflight import Data, preflight

    load_start = throughput.load_average()
    parts = tuple(x for x in args.parts.split(",") if x)
    if not parts or set(parts) - set(PARTS):
        raise ConfigError(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    data = [Data(args.data, ("train",), "--data", source=args.source, asked=True)] if args.data else []
    before = preflight(data=data, tracking=True)  # before any work: the shards are readable, the store answers
    gpu = torch.cuda.is_available() and not args.cpu
    size = args.size or (224 if gpu else 64)
    batch = args.batch_size or (256 if gpu else 16)
    steps, warmup = args.steps or (50 if gpu else 5), args.warmup if args.warmup is not None else (10 if gpu else 2)
    cores = max(1, (os.cpu_count() or 1) // args.workers)
    loader_workers = args.loader_workers if args.loader_workers is not None else min(8, max(1, cores - 1))
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        url = next(iter(before.manifests), None)
        if not url:
            images = args.images or min(8192, max(4, warmup + steps) * batch * args.workers)
            print(f"[bench] writing {images} synthetic JPEGs sized to {size} px to {tmp}", flush=True)
            url = throughput.synthetic_shards(tmp, size, images)
        cfg = recipe(args, url, size, batch, gpu, cores, loader_workers)
        spec = throughput.BenchSpec(cfg, steps=steps, warmup=warmup, extra={"synthetic_data": not args.data})
        result = throughput.run(spec, peak=args.peak_tflops, parts=parts)
    for line in result.verdicts:
        print(f"goal: {line}")
    command = throughput.command_line()
    run_id = throughput.log_mlflow(result, command, args.experiment)
    print(f"[bench] MLflow run {run_id} (experiment {args.experiment!r})")
    if args.record:
        title = (f"bench: {cfg.model.name} at {size} px on {'GPU' if gpu else 'CPU'} ({result.params['device']}), "
                 f"decode on {cfg.data.decode_on}")
        load = f"at the start {load_start}; at the end {throughput.load_average()}"
        throughput.append_entry(args.record, title, command, "\n".join(result.lines), result.verdicts,
                                machine=result.params["device"], load=load)
        print(f"[bench] appended to {args.record}")
    return 0


def recipe(args: argparse.Namespace, url: str, size: int, batch: int, gpu: bool, cores: int, loader_workers: int):
    """The recipe with the bench's settings: the global batch is `batch` per worker."""
    from orchestrator.config import load_train_config

    def flag(value: bool) -> str:
        return str(value).lower()

    return load_train_config(args.recipe, [
        f"model.name={args.model}", f"data.url={url}", f"data.size={size}", "data.scale_range=[]",
        f"data.num_workers={loader_workers}", f"data.decode_on={args.decode_on}",
        f"optim.batch_size={batch * args.workers}", f"scaling.num_workers={args.workers}",
        f"scaling.use_gpu={flag(gpu)}", f"scaling.cpus_per_worker={cores}", f"scaling.bf16={flag(args.bf16)}",
        f"scaling.channels_last={flag(args.channels_last)}", f"scaling.compile={flag(args.compile)}", *args.overrides,
    ])


if __name__ == "__main__":
    from orchestrator.run import command_environment, run_command

    command_environment()
    sys.exit(run_command(main, parser().parse_args()))
